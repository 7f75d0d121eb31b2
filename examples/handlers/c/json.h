// Just enough JSON for the config-file manifest: one object whose fields
// are strings, or (`reload`) a list of strings. Unknown fields, other value
// types and malformed text are errors.
#ifndef CONFIG_FILE_JSON_H
#define CONFIG_FILE_JSON_H

#include <stddef.h>

typedef struct manifest {
    char *path;
    char *version;
    char *content;
    size_t content_len;
    char **reload;
    size_t reload_len;
} manifest;

// Parses `text`; returns 0 and writes why into `error` when it cannot.
int manifest_parse(const char *text, size_t len, manifest *m, char *error, size_t error_len);

#endif
