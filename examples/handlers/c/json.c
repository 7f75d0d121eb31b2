#include "json.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *s;
    size_t len, at;
    char *error;
    size_t error_len;
} parser;

static int fail(parser *p, const char *what) {
    snprintf(p->error, p->error_len, "the manifest is not valid: %s at byte %zu", what, p->at);
    return 0;
}

static void skip_space(parser *p) {
    while (p->at < p->len && strchr(" \t\r\n", p->s[p->at]) && p->s[p->at]) p->at++;
}

static int eat(parser *p, char c) {
    skip_space(p);
    if (p->at < p->len && p->s[p->at] == c) {
        p->at++;
        return 1;
    }
    return 0;
}

static int hex4(parser *p, unsigned *out) {
    if (p->at + 4 > p->len) return 0;
    *out = 0;
    for (int i = 0; i < 4; i++) {
        char c = p->s[p->at++];
        unsigned d = c >= '0' && c <= '9' ? (unsigned)(c - '0')
                     : c >= 'a' && c <= 'f' ? (unsigned)(c - 'a' + 10)
                     : c >= 'A' && c <= 'F' ? (unsigned)(c - 'A' + 10)
                                            : 16u;
        if (d == 16) return 0;
        *out = *out * 16 + d;
    }
    return 1;
}

static size_t put_utf8(char *out, unsigned cp) {
    if (cp < 0x80) return out[0] = (char)cp, 1;
    if (cp < 0x800) return out[0] = (char)(0xC0 | cp >> 6), out[1] = (char)(0x80 | (cp & 0x3F)), 2;
    if (cp < 0x10000)
        return out[0] = (char)(0xE0 | cp >> 12), out[1] = (char)(0x80 | (cp >> 6 & 0x3F)),
               out[2] = (char)(0x80 | (cp & 0x3F)), 3;
    return out[0] = (char)(0xF0 | cp >> 18), out[1] = (char)(0x80 | (cp >> 12 & 0x3F)),
           out[2] = (char)(0x80 | (cp >> 6 & 0x3F)), out[3] = (char)(0x80 | (cp & 0x3F)), 4;
}

// A JSON string, unescaped and NUL-terminated (its length in `len`).
static int string(parser *p, char **out, size_t *len) {
    if (!eat(p, '"')) return fail(p, "expected a string");
    char *buf = malloc(p->len - p->at + 1), *w = buf;
    while (p->at < p->len && p->s[p->at] != '"') {
        char c = p->s[p->at++];
        if ((unsigned char)c < 0x20) return free(buf), fail(p, "control character in a string");
        if (c != '\\') {
            *w++ = c;
            continue;
        }
        if (p->at >= p->len) break;
        char e = p->s[p->at++];
        const char *from = "\"\\/bfnrt", *to = "\"\\/\b\f\n\r\t";
        const char *hit = e ? strchr(from, e) : NULL;
        if (hit) {
            *w++ = to[hit - from];
        } else if (e == 'u') {
            unsigned cp, low;
            if (!hex4(p, &cp)) return free(buf), fail(p, "bad \\u escape");
            if (cp >= 0xD800 && cp < 0xDC00) {
                if (!(eat(p, '\\') && eat(p, 'u') && hex4(p, &low) && low >= 0xDC00 && low < 0xE000))
                    return free(buf), fail(p, "unpaired surrogate");
                cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
            }
            w += put_utf8(w, cp);
        } else {
            return free(buf), fail(p, "bad escape");
        }
    }
    if (p->at >= p->len) return free(buf), fail(p, "unterminated string");
    p->at++;
    *w = 0;
    *out = buf;
    if (len) *len = (size_t)(w - buf);
    return 1;
}

static int string_list(parser *p, manifest *m) {
    if (!eat(p, '[')) return fail(p, "`reload` must be a list of strings (program first)");
    size_t cap = 4;
    m->reload = malloc(cap * sizeof(char *));
    if (eat(p, ']')) return 1;
    do {
        if (m->reload_len == cap) m->reload = realloc(m->reload, (cap *= 2) * sizeof(char *));
        if (!string(p, &m->reload[m->reload_len++], NULL)) return 0;
    } while (eat(p, ','));
    return eat(p, ']') ? 1 : fail(p, "expected `,` or `]`");
}

int manifest_parse(const char *text, size_t len, manifest *m, char *error, size_t error_len) {
    parser p = {text, len, 0, error, error_len};
    memset(m, 0, sizeof *m);
    if (!eat(&p, '{')) return fail(&p, "the manifest must be a JSON object");
    if (!eat(&p, '}')) {
        do {
            char *key;
            if (!string(&p, &key, NULL)) return 0;
            if (!eat(&p, ':')) return fail(&p, "expected `:`");
            skip_space(&p);
            int ok;
            if (strcmp(key, "path") == 0) ok = string(&p, &m->path, NULL);
            else if (strcmp(key, "version") == 0) ok = string(&p, &m->version, NULL);
            else if (strcmp(key, "content") == 0) ok = string(&p, &m->content, &m->content_len);
            else if (strcmp(key, "reload") == 0) ok = string_list(&p, m);
            else {
                snprintf(error, error_len, "unknown field '%s'", key);
                ok = 0;
            }
            free(key);
            if (!ok) return 0;
        } while (eat(&p, ','));
        if (!eat(&p, '}')) return fail(&p, "expected `,` or `}`");
    }
    skip_space(&p);
    return p.at == p.len ? 1 : fail(&p, "trailing characters");
}
