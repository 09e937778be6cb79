/*
 * kv: a key-value store in guest RAM with a line protocol on COM1.
 *   SET <key> <value>  -> OK
 *   GET <key>          -> VALUE <value> | NOTFOUND
 *   DEL <key>          -> OK | NOTFOUND
 *   SHUTDOWN           -> BYE, then the guest resets (the VM ends cleanly)
 * Anything else gets one "ERR <reason>" line. Keys are one word of at most 64
 * bytes; a value is the rest of the line, at most 200 bytes. The table
 * (open addressing, FNV-1a) lives at 2 MiB and holds 4096 entries.
 */
#include "guest.h"

#define TABLE_GPA 0x200000UL
#define SLOTS 4096UL
#define KEY_MAX 64
#define VALUE_MAX 200
#define LINE_MAX 255

struct slot {
    u8 used; /* 0 empty, 1 live, 2 deleted */
    u8 key_len;
    u16 value_len;
    char key[KEY_MAX];
    char value[VALUE_MAX];
};
#define TABLE ((struct slot *)TABLE_GPA)

static char line[LINE_MAX + 1];
static u64 line_len;
static int line_overflow;

static u64 hash(const char *s, u64 n) {
    u64 h = 0xcbf29ce484222325UL;
    while (n--) {
        h ^= (u8)*s++;
        h *= 0x100000001b3UL;
    }
    return h;
}

/* Returns the slot holding key, or (if insert) the slot to put it in; 0 if none. */
static struct slot *find(const char *key, u64 key_len, int insert) {
    u64 i = hash(key, key_len) & (SLOTS - 1);
    struct slot *reuse = 0;
    for (u64 probes = 0; probes < SLOTS; probes++, i = (i + 1) & (SLOTS - 1)) {
        struct slot *s = &TABLE[i];
        if (s->used == 0) return insert ? (reuse ? reuse : s) : 0;
        if (s->used == 2) {
            if (!reuse) reuse = s;
            continue;
        }
        if (s->key_len == key_len && memcmp(s->key, key, key_len) == 0) return s;
    }
    return insert ? reuse : 0;
}

static int word_is(const char *w, u64 n, const char *lit) {
    u64 i = 0;
    for (; i < n && lit[i]; i++)
        if (w[i] != lit[i]) return 0;
    return i == n && lit[i] == 0;
}

static void reply(const char *a, const char *b, u64 b_len) {
    puts(a);
    for (u64 i = 0; i < b_len; i++) putc(b[i]);
    putc('\n');
}

static void handle(char *l, u64 n) {
    u64 i = 0;
    while (i < n && l[i] != ' ') i++;
    char *cmd = l;
    u64 cmd_len = i;
    char *key = i < n ? l + i + 1 : l + n;
    u64 rest = i < n ? n - i - 1 : 0;
    u64 key_len = 0;
    while (key_len < rest && key[key_len] != ' ') key_len++;
    char *value = key + key_len + 1;
    u64 value_len = key_len < rest ? rest - key_len - 1 : 0;

    if (word_is(cmd, cmd_len, "SET")) {
        if (key_len == 0 || value_len == 0) return puts("ERR usage: SET <key> <value>\n");
        if (key_len > KEY_MAX) return puts("ERR key longer than 64 bytes\n");
        if (value_len > VALUE_MAX) return puts("ERR value longer than 200 bytes\n");
        struct slot *s = find(key, key_len, 1);
        if (!s) return puts("ERR store full\n");
        if (s->used != 1) {
            memcpy(s->key, key, key_len);
            s->key_len = (u8)key_len;
        }
        memcpy(s->value, value, value_len);
        s->value_len = (u16)value_len;
        s->used = 1;
        return puts("OK\n");
    }
    if (word_is(cmd, cmd_len, "GET") || word_is(cmd, cmd_len, "DEL")) {
        if (key_len == 0 || value_len != 0 || key_len < rest)
            return cmd[0] == 'G' ? puts("ERR usage: GET <key>\n") : puts("ERR usage: DEL <key>\n");
        if (key_len > KEY_MAX) return puts("ERR key longer than 64 bytes\n");
        struct slot *s = find(key, key_len, 0);
        if (!s) return puts("NOTFOUND\n");
        if (cmd[0] == 'D') {
            s->used = 2;
            return puts("OK\n");
        }
        return reply("VALUE ", s->value, s->value_len);
    }
    if (word_is(cmd, cmd_len, "SHUTDOWN") && rest == 0) {
        puts("BYE\n");
        guest_reset();
    }
    if (n == 0) return puts("ERR empty line\n");
    puts("ERR unknown command (SET, GET, DEL, SHUTDOWN)\n");
}

void guest_main(void) {
    console_init(1);
    irq_init(1 << IRQ_COM1);
    puts("kv ready\n");
    for (;;) {
        while (!console_rx_ready()) idle();
        char c = (char)console_getc();
        if (c == '\r') continue;
        if (c != '\n') {
            if (line_len < LINE_MAX) line[line_len++] = c;
            else line_overflow = 1;
            continue;
        }
        if (line_overflow) puts("ERR line longer than 255 bytes\n");
        else handle(line, line_len);
        line_len = 0;
        line_overflow = 0;
    }
}
