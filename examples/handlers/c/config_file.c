// An otabox handler in C: `example/config-file:1`.
//
// Validates a `key = value` configuration file given in the manifest,
// atomically replaces the declared file, keeps the old content for rollback
// and may run a reload command:
//
//   {"path": "/etc/example/app.conf", "version": "3",
//    "content": "port = 8080\n", "reload": ["/usr/bin/systemctl", "reload", "app"]}
//
// `handler.h`/`handler.c` are generated from ../wit by wit-bindgen's C
// generator (see build.sh); files go through wasi-libc, so only the
// directories the host preopens are reachable.

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "handler.h"
#include "json.h"

// The bindings name two fields `stdout` and `stderr`, which stdio.h
// defines as macros; this file never uses the streams.
#undef stdout
#undef stderr

#define UPDATE_TYPE "example/config-file:1"
#define BACKUP_KEY "backup"

enum {
    INVALID_MANIFEST = 10,
    READ_FAILED = 20,
    WRITE_FAILED = 21,
    RELOAD_REFUSED = 22,
    RELOAD_FAILED = 23,
    NOT_IN_PLACE = 24,
    VENDOR_FACILITY = 7,
};

typedef otabox_handler_types_step_context_t step_context;
typedef otabox_handler_types_outcome_t outcome;
typedef otabox_handler_types_status_t status;

static char message[1024];

static void set_status(status *s, uint32_t code, const char *text) {
    memset(s, 0, sizeof *s);
    s->result_code = code;
    s->extended_code.facility = VENDOR_FACILITY;
    handler_string_dup(&s->message, text);
}

static void fail(outcome *ret, uint32_t code, const char *text) {
    ret->tag = OTABOX_HANDLER_TYPES_OUTCOME_FAILED;
    set_status(&ret->val.failed, code, text);
}

static void succeed(outcome *ret) { ret->tag = OTABOX_HANDLER_TYPES_OUTCOME_SUCCESS; }

static void log_info(const char *text) {
    handler_string_t s;
    handler_string_set(&s, text);
    otabox_handler_context_log(OTABOX_HANDLER_TYPES_LOG_LEVEL_INFO, &s);
}

// A line of `content` is blank, a `#` comment or `key = value`.
static int check_content(const char *content, size_t len) {
    size_t line = 1, start = 0;
    while (start < len) {
        size_t end = start;
        while (end < len && content[end] != '\n') end++;
        size_t a = start, b = end;
        while (a < b && (content[a] == ' ' || content[a] == '\t' || content[a] == '\r')) a++;
        while (b > a && (content[b - 1] == ' ' || content[b - 1] == '\t' || content[b - 1] == '\r')) b--;
        if (a < b && content[a] != '#') {
            size_t eq = a;
            while (eq < b && content[eq] != '=') eq++;
            size_t k = eq;
            while (k > a && (content[k - 1] == ' ' || content[k - 1] == '\t')) k--;
            int ok = eq < b && k > a;
            for (size_t i = a; ok && i < k; i++) {
                char c = content[i];
                ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                     c == '_' || c == '.' || c == '-';
            }
            if (!ok) {
                snprintf(message, sizeof message, "line %zu of `content` is not `key = value`: '%.*s'",
                         line, (int)(b - a), content + a);
                return 0;
            }
        }
        start = end + 1;
        line++;
    }
    return 1;
}

// Parses and checks the manifest; on failure `message` says why.
static int parse(const handler_string_t *text, manifest *m) {
    if (!manifest_parse((const char *)text->ptr, text->len, m, message, sizeof message)) return 0;
    if (!m->path || m->path[0] != '/') {
        snprintf(message, sizeof message, "`path` must be an absolute path");
        return 0;
    }
    if (!m->version || !m->version[0]) {
        snprintf(message, sizeof message, "`version` must be a non-empty string");
        return 0;
    }
    if (!m->content) {
        snprintf(message, sizeof message, "`content` must be a string");
        return 0;
    }
    return check_content(m->content, m->content_len);
}

// Parses a phase's manifest; when it is invalid, `ret` says so and 0 is
// returned.
static int load(const step_context *ctx, manifest *m, outcome *ret) {
    if (parse(&ctx->manifest, m)) return 1;
    fail(ret, INVALID_MANIFEST, message);
    return 0;
}

// Reads the whole file: 1 and its bytes, 0 when it does not exist, -1 on
// any other error (errno set).
static int read_file(const char *path, char **data, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return errno == ENOENT ? 0 : -1;
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    size_t got;
    while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) buf = realloc(buf, cap *= 2);
    }
    int failed = !buf || ferror(f);
    fclose(f);
    if (failed) {
        free(buf);
        errno = EIO;
        return -1;
    }
    *data = buf;
    *len = n;
    return 1;
}

static int write_atomic(const char *path, const char *data, size_t len) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.otabox-new", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) return -1;
    int ok = fwrite(data, 1, len, f) == len && fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok = fclose(f) == 0 && ok;
    if (!ok || rename(tmp, path) != 0) {
        int saved = errno;
        unlink(tmp);
        errno = saved;
        return -1;
    }
    return 0;
}

// Whether the file holds exactly the manifest's content: 1, 0, or -1.
static int holds(const manifest *m) {
    char *data = NULL;
    size_t len = 0;
    int found = read_file(m->path, &data, &len);
    if (found <= 0) return found;
    int same = len == m->content_len && memcmp(data, m->content, len) == 0;
    free(data);
    return same;
}

void exports_otabox_handler_handler_describe(otabox_handler_types_description_t *ret) {
    handler_string_dup(&ret->name, "config-file-c");
    handler_string_dup(&ret->version, "1.0.0");
    ret->update_types.len = 1;
    ret->update_types.ptr = malloc(sizeof(handler_string_t));
    handler_string_dup(&ret->update_types.ptr[0], UPDATE_TYPE);
    handler_string_dup(&ret->contract, "1.1.0");
    ret->supports_rollback = true;
    ret->reboot = OTABOX_HANDLER_TYPES_REBOOT_BEHAVIOUR_NEVER;
}

bool exports_otabox_handler_handler_validate(step_context *ctx, otabox_handler_types_plan_t *ret,
                                             status *err) {
    manifest m;
    if (!parse(&ctx->manifest, &m)) {
        set_status(err, INVALID_MANIFEST, message);
        return false;
    }
    memset(ret, 0, sizeof *ret);
    char criteria[4096];
    snprintf(criteria, sizeof criteria, "%s@%s", m.path, m.version);
    handler_string_dup(&ret->installed_criteria, criteria);
    ret->reboot = OTABOX_HANDLER_TYPES_REBOOT_EXPECTATION_NONE;
    return true;
}

bool exports_otabox_handler_handler_is_installed(step_context *ctx, bool *ret, status *err) {
    manifest m;
    if (!parse(&ctx->manifest, &m)) {
        set_status(err, INVALID_MANIFEST, message);
        return false;
    }
    int same = holds(&m);
    if (same < 0) {
        snprintf(message, sizeof message, "cannot read %s: %s", m.path, strerror(errno));
        set_status(err, READ_FAILED, message);
        return false;
    }
    *ret = same == 1;
    return true;
}

void exports_otabox_handler_handler_download(step_context *ctx, outcome *ret) {
    (void)ctx;
    succeed(ret);
}

void exports_otabox_handler_handler_backup(step_context *ctx, outcome *ret) {
    manifest m;
    if (!load(ctx, &m, ret)) return;
    char *data = NULL;
    size_t len = 0;
    int found = read_file(m.path, &data, &len);
    if (found < 0) {
        snprintf(message, sizeof message, "cannot read %s: %s", m.path, strerror(errno));
        fail(ret, READ_FAILED, message);
        return;
    }
    // The backup: "0" when there was no file, "1" and its bytes otherwise.
    handler_list_u8_t kept = {malloc(len + 1), len + 1};
    kept.ptr[0] = found ? '1' : '0';
    if (found) memcpy(kept.ptr + 1, data, len);
    handler_string_t key;
    handler_string_set(&key, BACKUP_KEY);
    otabox_handler_checkpoint_host_error_t herr;
    if (!otabox_handler_checkpoint_set(&key, &kept, &herr)) {
        fail(ret, WRITE_FAILED, "cannot keep the backup in a checkpoint");
        return;
    }
    succeed(ret);
}

void exports_otabox_handler_handler_install(step_context *ctx, outcome *ret) {
    manifest m;
    if (!load(ctx, &m, ret)) return;
    if (write_atomic(m.path, m.content, m.content_len) != 0) {
        snprintf(message, sizeof message, "cannot write %s: %s", m.path, strerror(errno));
        fail(ret, WRITE_FAILED, message);
        return;
    }
    snprintf(message, sizeof message, "wrote %s version %s", m.path, m.version);
    log_info(message);
    succeed(ret);
}

void exports_otabox_handler_handler_apply(step_context *ctx, outcome *ret) {
    manifest m;
    if (!load(ctx, &m, ret)) return;
    if (m.reload_len == 0) {
        succeed(ret);
        return;
    }
    otabox_handler_process_command_t cmd;
    memset(&cmd, 0, sizeof cmd);
    handler_string_set(&cmd.program, m.reload[0]);
    cmd.args.len = m.reload_len - 1;
    cmd.args.ptr = calloc(m.reload_len, sizeof(handler_string_t));
    for (size_t i = 1; i < m.reload_len; i++) handler_string_set(&cmd.args.ptr[i - 1], m.reload[i]);
    cmd.timeout_ms.is_some = true;
    cmd.timeout_ms.val = 30000;
    otabox_handler_process_output_t out;
    otabox_handler_process_host_error_t herr;
    if (!otabox_handler_process_run(&cmd, &out, &herr)) {
        snprintf(message, sizeof message, "the host refused %s: %.*s", m.reload[0],
                 (int)herr.val.denied.len, (const char *)herr.val.denied.ptr);
        fail(ret, RELOAD_REFUSED, message);
        return;
    }
    if (!out.exit_code.is_some || out.exit_code.val != 0) {
        snprintf(message, sizeof message, "%s exited with %d: %.*s", m.reload[0],
                 out.exit_code.is_some ? out.exit_code.val : -1, (int)out.stderr.len,
                 (const char *)out.stderr.ptr);
        fail(ret, RELOAD_FAILED, message);
        return;
    }
    succeed(ret);
}

void exports_otabox_handler_handler_verify(step_context *ctx, outcome *ret) {
    manifest m;
    if (!load(ctx, &m, ret)) return;
    if (holds(&m) != 1) {
        snprintf(message, sizeof message, "%s does not hold version %s", m.path, m.version);
        fail(ret, NOT_IN_PLACE, message);
        return;
    }
    succeed(ret);
}

void exports_otabox_handler_handler_commit(step_context *ctx, outcome *ret) {
    (void)ctx;
    handler_string_t key;
    handler_string_set(&key, BACKUP_KEY);
    otabox_handler_checkpoint_host_error_t herr;
    otabox_handler_checkpoint_remove(&key, &herr);
    succeed(ret);
}

void exports_otabox_handler_handler_rollback(step_context *ctx, outcome *ret) {
    manifest m;
    if (!load(ctx, &m, ret)) return;
    handler_string_t key;
    handler_string_set(&key, BACKUP_KEY);
    handler_option_list_u8_t kept;
    otabox_handler_checkpoint_host_error_t herr;
    if (!otabox_handler_checkpoint_get(&key, &kept, &herr)) {
        fail(ret, READ_FAILED, "cannot read the backup checkpoint");
        return;
    }
    if (!kept.is_some || kept.val.len == 0) {
        ret->tag = OTABOX_HANDLER_TYPES_OUTCOME_SKIPPED;
        handler_string_dup(&ret->val.skipped, "nothing was changed");
        return;
    }
    int restored = kept.val.ptr[0] == '1'
                       ? write_atomic(m.path, (const char *)kept.val.ptr + 1, kept.val.len - 1)
                       : (unlink(m.path) == 0 || errno == ENOENT ? 0 : -1);
    if (restored != 0) {
        snprintf(message, sizeof message, "cannot restore %s: %s", m.path, strerror(errno));
        fail(ret, WRITE_FAILED, message);
        return;
    }
    snprintf(message, sizeof message, "restored %s", m.path);
    log_info(message);
    succeed(ret);
}

void exports_otabox_handler_handler_cleanup(step_context *ctx, outcome *ret) {
    manifest m;
    if (!load(ctx, &m, ret)) return;
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.otabox-new", m.path);
    unlink(tmp);
    succeed(ret);
}

bool exports_otabox_handler_handler_inventory(handler_string_t *config,
                                              exports_otabox_handler_handler_list_installed_item_t *ret,
                                              status *err) {
    (void)config;
    (void)err;
    ret->ptr = NULL;
    ret->len = 0;
    return true;
}
