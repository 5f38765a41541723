//! What the agent reports about its machine in every heartbeat (the
//! heartbeat loop adds its capacity, running attempts and sandboxes).

use std::path::Path;
use std::time::Instant;

use drover_proto::agent::Inventory;
use sysinfo::{Disks, MemoryRefreshKind, RefreshKind, System};

/// Collects inventory, reusing its buffers between heartbeats. A figure the
/// platform cannot give is reported as zero or empty, never as an error: a
/// heartbeat matters more than any one of its fields.
#[derive(Debug)]
pub struct Collector {
    sys: Option<System>,
    disks: Option<Disks>,
    started: Instant,
}

impl Collector {
    pub fn new() -> Collector {
        let memory = RefreshKind::nothing().with_memory(MemoryRefreshKind::nothing().with_ram());
        Collector {
            sys: System::new_with_specifics(memory).ok(),
            disks: Disks::new().ok(),
            started: Instant::now(),
        }
    }

    /// A fresh reading; disk figures are those of the filesystem that holds
    /// `state_dir`.
    pub fn collect(&mut self, state_dir: &Path) -> Inventory {
        if let Some(sys) = &mut self.sys {
            sys.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        }
        if let Some(disks) = &mut self.disks {
            disks.refresh(true);
        }
        let state_dir = state_dir
            .canonicalize()
            .unwrap_or_else(|_| state_dir.to_owned());
        let disk = self
            .disks
            .iter()
            .flat_map(|d| d.iter())
            .filter(|d| state_dir.starts_with(d.mount_point()))
            .max_by_key(|d| d.mount_point().as_os_str().len());
        let load = System::load_average()
            .map(|l| [l.one, l.five, l.fifteen])
            .unwrap_or_default();
        Inventory {
            hostname: hostname(),
            os: System::name().unwrap_or_else(|_| std::env::consts::OS.to_owned()),
            os_version: System::os_version().unwrap_or_default(),
            kernel: System::kernel_version().unwrap_or_default(),
            arch: std::env::consts::ARCH.to_owned(),
            cpu_count: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            load_avg: load,
            memory_total_bytes: self.sys.as_ref().map(|s| s.total_memory()).unwrap_or(0),
            memory_used_bytes: self.sys.as_ref().map(|s| s.used_memory()).unwrap_or(0),
            disk_total_bytes: disk.map(|d| d.total_space()).unwrap_or(0),
            disk_available_bytes: disk.map(|d| d.available_space()).unwrap_or(0),
            agent_version: crate::VERSION.to_owned(),
            agent_uptime_secs: self.started.elapsed().as_secs(),
            system_uptime_secs: System::uptime().unwrap_or(0),
            // The agent's own figures are the heartbeat loop's to fill in.
            capacity: 0,
            running: 0,
            sandboxes: Vec::new(),
            docker: None,
            problem: None,
        }
    }
}

impl Default for Collector {
    fn default() -> Self {
        Collector::new()
    }
}

/// The machine's host name, or "unknown".
pub fn hostname() -> String {
    System::host_name()
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_machine() {
        let mut c = Collector::new();
        let inv = c.collect(Path::new("/"));
        assert!(!inv.hostname.is_empty());
        assert!(inv.cpu_count >= 1);
        assert!(inv.memory_total_bytes > 0);
        assert!(inv.memory_used_bytes <= inv.memory_total_bytes);
        assert!(inv.disk_total_bytes > 0, "{inv:?}");
        assert!(!inv.kernel.is_empty());
    }
}
