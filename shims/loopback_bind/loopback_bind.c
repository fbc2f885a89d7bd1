/*
 * LD_PRELOAD library: turn wildcard listens into loopback listens.
 *
 * Some listeners of a PD server ignore SGLANG_HOST_IP: Mooncake's P2P handshake daemon binds
 * 0.0.0.0:<rpc port> and its TCP data transport binds [::]:<port> (dual-stack); torch's TCPStore
 * binds [::] as well. On a machine where servers must listen on 127.0.0.1 only, preload this
 * library into every server process (scripts/install_pd_cpu.sh builds it) and each bind() to
 * INADDR_ANY becomes the server's own IPv4 address, ELDR_BIND_ADDR (default 127.0.0.1, so
 * servers on 127.0.0.2, 127.0.0.3... or in their own network namespaces each keep their
 * listeners on their own host), and each bind() to in6addr_any becomes ::ffff:<that address>
 * (dual-stack socket: still reached at the IPv4 address) or ::1 (IPV6_V6ONLY socket).
 * Explicit addresses are untouched. ELDR_LOOPBACK_BIND=0 turns the rewrite off.
 *
 *   cc -shared -fPIC -O2 -o libeldr_loopback_bind.so loopback_bind.c -ldl
 */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

static int rewrite_enabled(void) {
    const char *v = getenv("ELDR_LOOPBACK_BIND");
    return v == NULL || strcmp(v, "0") != 0;
}

/* The address wildcard binds become, in network byte order. */
static in_addr_t own_addr(void) {
    const char *v = getenv("ELDR_BIND_ADDR");
    struct in_addr a;
    if (v != NULL && inet_pton(AF_INET, v, &a) == 1) return a.s_addr;
    return htonl(INADDR_LOOPBACK);
}

__attribute__((visibility("default"))) int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static bind_fn real_bind = NULL;
    if (real_bind == NULL) real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
    if (addr != NULL && rewrite_enabled()) {
        if (addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
            struct sockaddr_in in4;
            memcpy(&in4, addr, sizeof in4);
            if (in4.sin_addr.s_addr == htonl(INADDR_ANY)) {
                in4.sin_addr.s_addr = own_addr();
                return real_bind(fd, (const struct sockaddr *)&in4, sizeof in4);
            }
        } else if (addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
            struct sockaddr_in6 in6;
            memcpy(&in6, addr, sizeof in6);
            if (IN6_IS_ADDR_UNSPECIFIED(&in6.sin6_addr)) {
                int v6only = 0;
                socklen_t optlen = sizeof v6only;
                if (getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &optlen) != 0) v6only = 0;
                if (v6only) {
                    in6.sin6_addr = in6addr_loopback;
                } else {
                    in_addr_t v4 = own_addr();
                    memset(&in6.sin6_addr, 0, sizeof in6.sin6_addr); /* ::ffff:a.b.c.d */
                    in6.sin6_addr.s6_addr[10] = 0xff;
                    in6.sin6_addr.s6_addr[11] = 0xff;
                    memcpy(&in6.sin6_addr.s6_addr[12], &v4, 4);
                }
                return real_bind(fd, (const struct sockaddr *)&in6, sizeof in6);
            }
        }
    }
    return real_bind(fd, addr, len);
}
