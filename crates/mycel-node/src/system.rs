//! What the machine is and how it is doing: hardware, load and power state, read from
//! `/proc` and a `/sys`-like folder (tests pass their own).

use std::fs;
use std::path::Path;

use mycel_core::statement::{Capabilities, DatasetOffer, Hardware, Load, PowerState};

use crate::models::ModelService;

/// What a node announces beyond what it reads: its datasets, its network's metering and its
/// site.
#[derive(Debug, Clone, Default)]
pub struct Extra {
    /// Datasets held for federated training.
    pub datasets: Vec<DatasetOffer>,
    /// On a metered network.
    pub metered: bool,
    /// Where its operator says it is.
    pub site: Option<String>,
}

/// Reads the node's capabilities: the models it serves and its queue, and the machine's
/// hardware, load and power. `sys_root` is normally `/sys`.
pub fn read_capabilities(sys_root: &Path, models: &ModelService, extra: &Extra) -> Capabilities {
    let mut load = read_load();
    load.queue_depth = u32::try_from(models.queue_depth()).unwrap_or(u32::MAX);
    Capabilities {
        models: models.offers(),
        hardware: read_hardware(),
        load,
        power: read_power(sys_root),
        datasets: extra.datasets.clone(),
        metered: extra.metered,
        site: extra.site.clone(),
    }
}

fn read_hardware() -> Hardware {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let memory_bytes = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024);
    Hardware {
        cores,
        memory_bytes,
        gpu: read_gpu(),
    }
}

fn read_gpu() -> Option<String> {
    let dir = fs::read_dir("/proc/driver/nvidia/gpus").ok()?;
    dir.flatten().find_map(|gpu| {
        let info = fs::read_to_string(gpu.path().join("information")).ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("Model:").map(|m| m.trim().to_owned()))
    })
}

fn read_load() -> Load {
    let cores = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f32);
    let load1 = fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<f32>().ok())
        })
        .unwrap_or(0.0);
    // Coarse (one decimal): an announcement is re-sent when this changes.
    let utilisation = ((load1 / cores).clamp(0.0, 1.0) * 10.0).round() / 10.0;
    Load {
        queue_depth: 0,
        utilisation,
    }
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

/// Power state from `<sys_root>/class/power_supply` and `<sys_root>/class/thermal`; `None`
/// where neither exists (most servers and containers).
pub fn read_power(sys_root: &Path) -> Option<PowerState> {
    let mut power = PowerState::default();
    let mut found = false;
    if let Ok(supplies) = fs::read_dir(sys_root.join("class/power_supply")) {
        for supply in supplies.flatten() {
            let path = supply.path();
            match read_trimmed(&path.join("type")).as_deref() {
                Some("Mains") | Some("USB") => {
                    if let Some(online) = read_trimmed(&path.join("online")) {
                        let online = online == "1";
                        power.on_mains = Some(power.on_mains.unwrap_or(false) || online);
                        found = true;
                    }
                }
                Some("Battery") => {
                    if let Some(pct) =
                        read_trimmed(&path.join("capacity")).and_then(|c| c.parse::<u8>().ok())
                    {
                        power.battery_pct = Some(pct.min(100));
                        found = true;
                    }
                }
                _ => {}
            }
        }
    }
    if let Ok(zones) = fs::read_dir(sys_root.join("class/thermal")) {
        for zone in zones.flatten() {
            let temp = read_trimmed(&zone.path().join("temp"))
                .and_then(|t| t.parse::<i64>().ok())
                .map(|milli| milli as f32 / 1000.0);
            if let Some(t) = temp {
                power.temperature_c = Some(power.temperature_c.map_or(t, |m: f32| m.max(t)));
                found = true;
            }
        }
    }
    found.then_some(power)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_state_is_read_from_a_sys_like_folder() {
        let root = tempfile::tempdir().unwrap();
        let supply = root.path().join("class/power_supply");
        fs::create_dir_all(supply.join("AC")).unwrap();
        fs::write(supply.join("AC/type"), "Mains\n").unwrap();
        fs::write(supply.join("AC/online"), "0\n").unwrap();
        fs::create_dir_all(supply.join("BAT0")).unwrap();
        fs::write(supply.join("BAT0/type"), "Battery\n").unwrap();
        fs::write(supply.join("BAT0/capacity"), "17\n").unwrap();
        let thermal = root.path().join("class/thermal");
        fs::create_dir_all(thermal.join("thermal_zone0")).unwrap();
        fs::write(thermal.join("thermal_zone0/temp"), "61500\n").unwrap();
        fs::create_dir_all(thermal.join("thermal_zone1")).unwrap();
        fs::write(thermal.join("thermal_zone1/temp"), "40000\n").unwrap();

        let power = read_power(root.path()).unwrap();
        assert_eq!(power.on_mains, Some(false));
        assert_eq!(power.battery_pct, Some(17));
        assert_eq!(power.temperature_c, Some(61.5));
    }

    #[test]
    fn power_state_is_absent_without_sys_entries() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(read_power(root.path()), None);
    }

    #[test]
    fn hardware_reports_this_machine() {
        let caps = read_capabilities(
            Path::new("/nonexistent"),
            &ModelService::new(vec![], 1),
            &Extra::default(),
        );
        assert!(caps.hardware.cores >= 1);
        assert!(caps.hardware.memory_bytes > 0);
        assert!((0.0..=1.0).contains(&caps.load.utilisation));
    }
}
