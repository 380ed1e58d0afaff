/* err.h - tidald's error codes: the one base header every module may include.
 *
 * Functions that can fail return 0 on success or one of these negative codes,
 * and fill a caller-supplied message buffer (ENG_ERRMSG_LEN bytes) with a
 * human-readable explanation that names the offending field, tensor or value.
 */
#ifndef TIDALD_BASE_ERR_H
#define TIDALD_BASE_ERR_H

#include <stdarg.h>
#include <stddef.h>

#define ENG_ERRMSG_LEN 256

typedef enum {
    ENG_OK = 0,
    ENG_ENOMEM = -1,       /* allocation failed */
    ENG_EIO = -2,          /* open/read/mmap failed */
    ENG_EFORMAT = -3,      /* malformed or hostile input file */
    ENG_EUNSUPPORTED = -4, /* well-formed but not supported (tensor type, architecture) */
    ENG_EINVAL = -5,       /* invalid argument */
    ENG_ERANGE = -6,       /* value out of range (context exceeded, token id, ...) */
    ENG_ENOSPACE = -7,     /* KV cache has no free block */
} eng_err_t;

/* Static string naming an error code. */
const char *eng_strerror(int err);

/* snprintf into msg (may be NULL) and return err; keeps error paths one line long. */
int eng_fail(char *msg, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif
