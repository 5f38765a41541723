//! Where the server's own HTTP requests (webhooks) may go. By default
//! nowhere inside: not loopback, private, link-local (cloud metadata at
//! 169.254.169.254), shared (CGNAT), unique-local, unspecified, multicast or
//! broadcast addresses, however the URL spells them (`[::1]`, `0.0.0.0`,
//! `2130706433`). An operator allows internal receivers by address or
//! network (`webhook_allow`). A URL is checked when it is registered, and
//! the addresses a host name resolves to are checked when it is sent to
//! (the resolver hands reqwest only allowed addresses, so a name cannot be
//! re-pointed between the check and the connection).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// The addresses webhooks may reach besides public ones.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    allow: Arc<Vec<IpNet>>,
}

impl EgressPolicy {
    pub fn new(allow: &[IpNet]) -> EgressPolicy {
        EgressPolicy {
            allow: Arc::new(allow.to_vec()),
        }
    }

    /// Parses `webhook_allow` entries: networks (`10.1.0.0/16`) or single
    /// addresses (`127.0.0.1`, `::1`).
    pub fn parse_allow(entries: &[String]) -> Result<Vec<IpNet>, String> {
        entries
            .iter()
            .map(|e| {
                let e = e.trim();
                e.parse::<IpNet>()
                    .or_else(|_| e.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("webhook_allow: '{e}' is neither an address nor a network (e.g. 10.0.0.0/8)"))
            })
            .collect()
    }

    /// Ok when `ip` may be reached; else why not.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), String> {
        let ip = canonical(ip);
        match internal(ip) {
            Some(kind) if !self.allow.iter().any(|n| n.contains(&ip)) => Err(format!(
                "{ip} is a {kind} address; webhooks go only to public addresses unless webhook_allow lists it"
            )),
            _ => Ok(()),
        }
    }

    /// Checks a webhook URL: http(s), a host, no internal address given
    /// literally (a name is checked when it is resolved, at send time).
    pub fn check_url(&self, url: &str) -> Result<(), String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("url: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err("url must be http:// or https://".into());
        }
        match parsed.host() {
            None => Err("url must name a host".into()),
            Some(url::Host::Ipv4(ip)) => self
                .check_ip(IpAddr::V4(ip))
                .map_err(|e| format!("url: {e}")),
            Some(url::Host::Ipv6(ip)) => self
                .check_ip(IpAddr::V6(ip))
                .map_err(|e| format!("url: {e}")),
            Some(url::Host::Domain(d)) => {
                let d = d.trim_end_matches('.').to_ascii_lowercase();
                if d == "localhost" || d.ends_with(".localhost") {
                    self.check_ip(IpAddr::from([127, 0, 0, 1]))
                        .map_err(|e| format!("url: {d} is loopback: {e}"))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// IPv4-mapped IPv6 addresses are their IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// What kind of internal address `ip` is, if it is one.
fn internal(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_unspecified() || o[0] == 0 {
                Some("unspecified")
            } else if v4.is_private() {
                Some("private")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
                Some("shared (CGNAT)")
            } else if v4.is_broadcast() || v4.is_multicast() || o[0] >= 240 {
                Some("broadcast, multicast or reserved")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if (s[0] & 0xfe00) == 0xfc00 {
                Some("unique-local")
            } else if (s[0] & 0xffc0) == 0xfe80 {
                Some("link-local")
            } else if v6.is_multicast() {
                Some("multicast")
            } else {
                None
            }
        }
    }
}

/// A resolver for the webhook client that returns only the addresses the
/// policy allows, and an error naming the refused ones when none is left.
#[derive(Debug, Clone)]
pub struct Resolver {
    pub policy: EgressPolicy,
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = Vec::new();
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match policy.check_ip(a.ip()) {
                    Ok(()) => true,
                    Err(why) => {
                        refused.push(why);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let why = if refused.is_empty() {
                    format!("{host} resolves to no address")
                } else {
                    format!("refused {host}: {}", refused.join("; "))
                };
                return Err(why.into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// A URL as shown in API answers and logs: without its user and password.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            let s = u.to_string();
            s.replacen("://", "://***@", 1)
        }
        Ok(_) => url.to_owned(),
        Err(_) => "(invalid url)".to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn internal_targets_are_refused_however_spelled() {
        let p = EgressPolicy::default();
        for url in [
            "http://169.254.169.254/latest/meta-data/",
            "http://127.0.0.1:8080/api/v1/jobs",
            "http://[::1]/",
            "http://0.0.0.0/",
            "http://2130706433/",
            "http://0x7f000001/",
            "http://10.1.2.3/",
            "http://192.168.0.1/",
            "http://172.16.0.1/",
            "http://100.64.0.1/",
            "http://[fd00::1]/",
            "http://[fe80::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://localhost:9/",
            "http://api.localhost/",
        ] {
            assert!(p.check_url(url).is_err(), "{url}");
        }
        assert!(p.check_url("https://hooks.example.com/x").is_ok());
        assert!(p.check_url("http://93.184.216.34/").is_ok());
        assert!(p.check_url("ftp://example.com/").is_err());
    }

    #[test]
    fn an_allow_list_opens_what_it_names() {
        let allow = EgressPolicy::parse_allow(&["127.0.0.1".into(), "10.0.0.0/8".into()]).unwrap();
        let p = EgressPolicy::new(&allow);
        assert!(p.check_url("http://127.0.0.1:9000/hook").is_ok());
        assert!(p.check_url("http://10.9.9.9/").is_ok());
        assert!(p.check_url("http://127.0.0.2/").is_err());
        assert!(p.check_url("http://169.254.169.254/").is_err());
        assert!(EgressPolicy::parse_allow(&["nonsense".into()]).is_err());
    }

    #[tokio::test]
    async fn the_resolver_hands_out_only_allowed_addresses() {
        use reqwest::dns::Resolve;
        use std::str::FromStr;
        let name = || reqwest::dns::Name::from_str("localhost").unwrap();
        let closed = Resolver {
            policy: EgressPolicy::default(),
        };
        let err = closed.resolve(name()).await.err().unwrap().to_string();
        assert!(err.contains("loopback"), "{err}");
        let open = Resolver {
            policy: EgressPolicy::new(
                &EgressPolicy::parse_allow(&["127.0.0.0/8".into(), "::1".into()]).unwrap(),
            ),
        };
        let addrs: Vec<SocketAddr> = open.resolve(name()).await.unwrap().collect();
        assert!(!addrs.is_empty());
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
    }

    #[test]
    fn credentials_never_shown() {
        assert_eq!(
            redact_url("https://user:secret@hooks.example.com/x?y=1"),
            "https://***@hooks.example.com/x?y=1"
        );
        assert_eq!(
            redact_url("https://hooks.example.com/x"),
            "https://hooks.example.com/x"
        );
    }
}
