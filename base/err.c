/* err.c - error code names and the message helper. */
#include "err.h"

#include <stdio.h>

const char *eng_strerror(int err) {
    switch (err) {
    case ENG_OK:
        return "ok";
    case ENG_ENOMEM:
        return "out of memory";
    case ENG_EIO:
        return "I/O error";
    case ENG_EFORMAT:
        return "malformed input";
    case ENG_EUNSUPPORTED:
        return "unsupported";
    case ENG_EINVAL:
        return "invalid argument";
    case ENG_ERANGE:
        return "out of range";
    case ENG_ENOSPACE:
        return "KV cache full";
    default:
        return "unknown error";
    }
}

int eng_fail(char *msg, int err, const char *fmt, ...) {
    if (msg) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, ENG_ERRMSG_LEN, fmt, ap);
        va_end(ap);
    }
    return err;
}
