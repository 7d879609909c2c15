/* syslog(3) for modules loaded into a worker (a PKCS#11 module such as SoftHSM2 logs its
 * errors with syslog). glibc's syslog opens and connects an AF_UNIX socket to /dev/log on first
 * use, which the worker's seccomp policy forbids (no socket, no connect): the call would kill
 * the worker. aziotd exports these symbols so that modules bind to them instead of glibc's; the
 * message goes to aziotd's own log (stderr, the journal). */
#include <stdarg.h>
#include <stdio.h>

extern void aziot_syslog_message(int priority, const char *message);

static void forward(int priority, const char *format, va_list ap) {
    char buffer[1024];
    vsnprintf(buffer, sizeof buffer, format, ap);
    aziot_syslog_message(priority, buffer);
}

void openlog(const char *ident, int option, int facility) { (void)ident; (void)option; (void)facility; }
void closelog(void) {}
void vsyslog(int priority, const char *format, va_list ap) { forward(priority, format, ap); }
void __vsyslog_chk(int priority, int flag, const char *format, va_list ap) { (void)flag; forward(priority, format, ap); }
void syslog(int priority, const char *format, ...) {
    va_list ap;
    va_start(ap, format);
    forward(priority, format, ap);
    va_end(ap);
}
void __syslog_chk(int priority, int flag, const char *format, ...) {
    va_list ap;
    (void)flag;
    va_start(ap, format);
    forward(priority, format, ap);
    va_end(ap);
}
