//! Address prefix → region, for sending a client to a site near it.

use std::net::IpAddr;

use fep_shared::sites_config::RegionConfig;
use ipnet::IpNet;

/// A region, as an index into [`Regions::names`].
pub type RegionId = u16;

#[derive(Debug, Clone, Default)]
pub struct Regions {
    /// Longest prefix first, so the first match is the most specific.
    prefixes: Vec<(IpNet, RegionId)>,
    names: Vec<String>,
}

impl Regions {
    pub fn new(config: &[RegionConfig]) -> Regions {
        let mut regions = Regions::default();
        for r in config {
            let id = regions.intern(&r.region);
            regions.prefixes.push((r.prefix.trunc(), id));
        }
        regions
            .prefixes
            .sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
        regions
    }

    /// The id of a region name, taking a new one for a name no prefix has
    /// (a site may be in a region no client prefix maps to yet).
    pub fn intern(&mut self, name: &str) -> RegionId {
        match self.names.iter().position(|n| n == name) {
            Some(i) => i as RegionId,
            None => {
                self.names.push(name.to_string());
                (self.names.len() - 1) as RegionId
            }
        }
    }

    /// The region of `addr`: the longest configured prefix holding it.
    pub fn lookup(&self, addr: IpAddr) -> Option<RegionId> {
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
            v4 => v4,
        };
        self.prefixes
            .iter()
            .find(|(net, _)| net.contains(&addr))
            .map(|(_, id)| *id)
    }
}

#[cfg(test)]
impl Regions {
    pub fn name(&self, id: RegionId) -> &str {
        self.names.get(usize::from(id)).map_or("", |n| n.as_str())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Document 002's Table VI as shipped (`deploy/regions-table-vi.toml`).
    pub(crate) fn table_vi() -> Vec<RegionConfig> {
        #[derive(serde::Deserialize)]
        struct File {
            sites: Sites,
        }
        #[derive(serde::Deserialize)]
        struct Sites {
            region: Vec<RegionConfig>,
        }
        let text = include_str!("../../../deploy/regions-table-vi.toml");
        toml::from_str::<File>(text).unwrap().sites.region
    }

    #[test]
    fn golden_table_vi_a_query_from_211_is_pacific_rim() {
        let r = Regions::new(&table_vi());
        let id = r.lookup("211.123.11.20".parse().unwrap()).unwrap();
        assert_eq!(r.name(id), "apnic-pacific-rim");
        for site_vip in ["203.1.2.3", "204.0.0.1", "211.9.9.9", "212.4.4.4"] {
            assert_eq!(r.lookup(site_vip.parse().unwrap()), Some(id), "{site_vip}");
        }
        let europe = r.lookup("194.1.1.1".parse().unwrap()).unwrap();
        assert_eq!(r.name(europe), "ripe-europe");
        assert_eq!(r.lookup("10.0.0.1".parse().unwrap()), None);
    }

    #[test]
    fn the_longest_prefix_wins_and_mapped_v6_counts_as_v4() {
        let mut config = table_vi();
        config.push(RegionConfig {
            prefix: "211.123.0.0/16".parse().unwrap(),
            region: "tokyo".into(),
        });
        config.push(RegionConfig {
            prefix: "2001:db8::/32".parse().unwrap(),
            region: "doc".into(),
        });
        let r = Regions::new(&config);
        let at = |a: &str| {
            r.lookup(a.parse().unwrap())
                .map(|id| r.name(id).to_string())
        };
        assert_eq!(at("211.123.11.20").as_deref(), Some("tokyo"));
        assert_eq!(at("211.124.11.20").as_deref(), Some("apnic-pacific-rim"));
        assert_eq!(at("::ffff:211.123.1.1").as_deref(), Some("tokyo"));
        assert_eq!(at("2001:db8::1").as_deref(), Some("doc"));
    }
}
