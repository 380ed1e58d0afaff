/* test_backend.c - choosing a backend (--device) and the backend memory interface. */
#include "../../engine/backend.h"
#include "../../engine/engine.h"
#include "helpers.h"

#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

Test(backend, test_device_names_parse_and_others_are_refused) {
    cr_expect_eq(eng_device_parse("auto"), ENG_DEVICE_AUTO);
    cr_expect_eq(eng_device_parse("cpu"), ENG_DEVICE_CPU);
    cr_expect_eq(eng_device_parse("cuda"), ENG_DEVICE_CUDA);
    cr_expect_eq(eng_device_parse("gpu"), -1);
    cr_expect_eq(eng_device_parse(""), -1);
    cr_expect_eq(eng_device_parse("CUDA"), -1);
    cr_expect_eq(eng_device_parse(NULL), -1);
}

Test(backend, test_cpu_device_gives_the_cpu_backend_with_host_memory) {
    eng_backend_t *be;
    char msg[ENG_ERRMSG_LEN];
    cr_assert_eq(eng_backend_open(&be, ENG_DEVICE_CPU, 2, msg), 0, "%s", msg);
    cr_expect_str_eq(be->ops->name, "cpu");
    uint8_t *p = be->ops->alloc(be, 64), host[64], back[64];
    cr_assert_not_null(p);
    for (int i = 0; i < 64; i++) cr_expect_eq(p[i], 0, "alloc must zero-fill");
    for (int i = 0; i < 64; i++) host[i] = (uint8_t)(i * 7);
    be->ops->upload(be, p, host, 64);
    be->ops->download(be, back, p, 64);
    cr_expect_eq(memcmp(host, back, 64), 0);
    be->ops->release(be, p);
    be->ops->destroy(be);
}

/* auto takes the GPU exactly when --device cuda can have it; when it cannot, cuda fails with
 * a reason and auto runs on the CPU */
Test(backend, test_auto_takes_cuda_exactly_when_cuda_is_available) {
    eng_backend_t *cuda = NULL, *autob = NULL;
    char msg[ENG_ERRMSG_LEN] = "", amsg[ENG_ERRMSG_LEN];
    int rc = eng_backend_open(&cuda, ENG_DEVICE_CUDA, 2, msg);
    if (rc == 0) {
        cr_expect_str_eq(cuda->ops->name, "cuda");
        cuda->ops->destroy(cuda);
    } else {
        cr_expect_null(cuda);
        cr_expect_eq(rc, ENG_EUNSUPPORTED, "%s", msg);
        cr_expect(strncmp(msg, "--device cuda: ", 15) == 0 && strlen(msg) > 20,
                  "the error names the device and the reason: '%s'", msg);
    }
    cr_assert_eq(eng_backend_open(&autob, ENG_DEVICE_AUTO, 2, amsg), 0, "%s", amsg);
    cr_expect_str_eq(autob->ops->name, rc == 0 ? "cuda" : "cpu");
    autob->ops->destroy(autob);
}

Test(backend, test_context_on_an_unavailable_device_fails_cleanly) {
    eng_backend_t *probe = NULL;
    char msg[ENG_ERRMSG_LEN];
    if (eng_backend_open(&probe, ENG_DEVICE_CUDA, 1, msg) == 0) {
        probe->ops->destroy(probe);
        cr_skip_test("a CUDA GPU is present: nothing unavailable to test");
    }
    eng_model_t *m;
    cr_assert_eq(eng_model_load(&m, synth_path("tiny-f32"), msg), 0, "%s", msg);
    eng_ctx_params_t p;
    eng_ctx_params_default(&p);
    p.device = ENG_DEVICE_CUDA;
    eng_ctx_t *c = (eng_ctx_t *)1;
    cr_expect_eq(eng_ctx_create(&c, m, &p, msg), ENG_EUNSUPPORTED);
    cr_expect_null(c);
    cr_expect(strstr(msg, "--device cuda") != NULL, "%s", msg);
    p.device = ENG_DEVICE_AUTO;
    cr_assert_eq(eng_ctx_create(&c, m, &p, msg), 0, "%s", msg);
    cr_expect_str_eq(eng_ctx_backend_name(c), "cpu");
    eng_ctx_free(c);
    eng_model_free(m);
}
