//! The public listener's connection limits (`server.max_connections`,
//! `server.max_connections_per_ip`, trusted proxies exempt per address), their refusal counter
//! and their coalesced WARN. Part of `server`; imports the gateway, config, metrics and logging.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use dashmap::DashMap;

use crate::config::Config;
use crate::forwarded::is_trusted;
use crate::gateway::Gateway;
use crate::metrics::ConnLimit;

/// Holds a connection's place in the listener's count and, unless its peer is a trusted proxy,
/// in its client address's count; dropping it gives both back.
pub(super) struct ConnSlot {
    /// The per-address key (IPv6 by /64); None for a trusted proxy, which is not capped per
    /// address.
    ip: Option<IpAddr>,
    per_ip: Arc<DashMap<IpAddr, usize>>,
    gw: Gateway,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.gw
            .metrics()
            .open_connections
            .fetch_sub(1, Ordering::Relaxed);
        let Some(ip) = self.ip else { return };
        if let dashmap::mapref::entry::Entry::Occupied(mut e) = self.per_ip.entry(ip) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

/// The public listener's connection limits: `server.max_connections` for all connections, and
/// `server.max_connections_per_ip` for each client address except the peers in
/// `server.trusted_proxies` (a load balancer carries many clients on its one address; capping
/// it would silently cut them all off). A refused connection is closed unanswered, counted in
/// `tokengate_connections_refused_total{limit}` and logged as a WARN, coalesced per limit (one
/// line per [`crate::logging::INTERVAL`] of the gateway clock, with the count left out).
pub(super) struct Admission {
    per_ip: Arc<DashMap<IpAddr, usize>>,
    log: crate::logging::Coalescer,
}

impl Admission {
    pub(super) fn new() -> Self {
        Admission {
            per_ip: Arc::new(DashMap::new()),
            log: crate::logging::Coalescer::new(crate::logging::INTERVAL),
        }
    }

    /// A slot for a new connection from `peer`, or None (refused: counted and logged).
    pub(super) fn admit(&self, gw: &Gateway, cfg: &Config, peer: SocketAddr) -> Option<ConnSlot> {
        // Counted first and given back when refused: exact even with several accept loops
        // (`server.workers`) admitting at once.
        let open = &gw.metrics().open_connections;
        if open.fetch_add(1, Ordering::Relaxed) >= cfg.server.max_connections as i64 {
            open.fetch_sub(1, Ordering::Relaxed);
            self.refuse(gw, peer, ConnLimit::Total, cfg.server.max_connections);
            return None;
        }
        let peer_ip = peer.ip();
        // The accept loop has made an IPv4-mapped peer (`::ffff:a.b.c.d`) its IPv4 address.
        let trusted = is_trusted(peer_ip, &cfg.server.trusted_proxies);
        let ip = if trusted {
            None
        } else {
            // IPv6 by /64, like the failed-auth limiter: one host usually holds the whole /64.
            let ip = crate::ratelimit::client_key(peer_ip);
            let max = cfg.server.max_connections_per_ip;
            let mut n = self.per_ip.entry(ip).or_insert(0);
            if *n >= max {
                let empty = *n == 0;
                drop(n);
                if empty {
                    self.per_ip.remove_if(&ip, |_, n| *n == 0);
                }
                open.fetch_sub(1, Ordering::Relaxed);
                self.refuse(gw, peer, ConnLimit::PerIp, max);
                return None;
            }
            *n += 1;
            Some(ip)
        };
        Some(ConnSlot {
            ip,
            per_ip: self.per_ip.clone(),
            gw: gw.clone(),
        })
    }

    fn refuse(&self, gw: &Gateway, peer: SocketAddr, limit: ConnLimit, max: usize) {
        gw.metrics().connection_refused(limit);
        let kind = match limit {
            ConnLimit::PerIp => "connection_refused_per_ip",
            ConnLimit::Total => "connection_refused_total",
        };
        let Some(suppressed) = self.log.allow_at_ms(kind, gw.now_ms()) else {
            return;
        };
        let key = limit.config_key();
        let (holder, advice) = match limit {
            ConnLimit::PerIp => (
                "this client address",
                ", or list the address in server.trusted_proxies if it is a load balancer or \
                 proxy (those are not capped per address)",
            ),
            ConnLimit::Total => ("the public listener", " (and the open-files limit with it)"),
        };
        tracing::warn!(
            kind,
            suppressed,
            peer = %peer.ip(),
            limit = key,
            max,
            "connection refused: {holder} already holds {max} connections ({key}); raise {key}{advice}"
        );
    }
}
