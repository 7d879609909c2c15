//! The top-level `additional_info` of `check` (spec aziotctl.md §4.5) and time formatting.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::Ctx;

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// (year, month, day, hour, minute, second) of a Unix time, UTC (proleptic Gregorian).
fn civil(secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        (rem % 3600 / 60) as u32,
        (rem % 60) as u32,
    )
}

/// `2026-07-14T10:00:00Z`
pub fn rfc3339(secs: i64) -> String {
    let (y, mo, d, h, mi, s) = civil(secs);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// `2026-07-14 10:00:00 UTC`
pub fn utc_display(secs: i64) -> String {
    let (y, mo, d, h, mi, s) = civil(secs);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02} UTC")
}

/// Binary units with two decimals: `7.63 GiB`.
fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < units.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2} {}", units[unit])
}

fn os_release() -> Map<String, Value> {
    let text = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .unwrap_or_default();
    let mut os = Map::new();
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let key = match k.trim() {
            "ID" => "id",
            "VERSION_ID" => "version_id",
            "VARIANT_ID" => "variant_id",
            "BUILD_ID" => "build_id",
            _ => continue,
        };
        let v = v.trim().trim_matches('"').trim_matches('\'');
        os.insert(key.to_owned(), v.into());
    }
    os.insert("arch".into(), std::env::consts::ARCH.into());
    os.insert("bitness".into(), (usize::BITS as u64).into());
    os
}

fn dmi() -> Value {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/sys/devices/virtual/dmi/id/{name}"))
            .ok()
            .map(|s| s.trim().to_owned())
    };
    json!({"product": read("product_name"), "vendor": read("sys_vendor")})
}

/// RAM and swap from /proc/meminfo (true byte counts: upstream's are 1024× too large).
fn memory() -> (u64, u64, u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let (total, avail) = (field("MemTotal"), field("MemAvailable"));
    let (swap_total, swap_free) = (field("SwapTotal"), field("SwapFree"));
    (
        total.saturating_sub(avail),
        total,
        swap_total.saturating_sub(swap_free),
        swap_total,
    )
}

/// Block-device file systems from /proc/mounts, once per device.
fn disks() -> Vec<Value> {
    let text = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [device, mount, fstype, ..] = f[..] else {
            continue;
        };
        if !device.starts_with("/dev/") || !seen.insert(device.to_owned()) {
            continue;
        }
        let Ok(st) = nix::sys::statvfs::statvfs(mount) else {
            continue;
        };
        let total = st.blocks() as u64 * st.fragment_size() as u64;
        let avail = st.blocks_available() as u64 * st.fragment_size() as u64;
        let name = device.trim_start_matches("/dev/");
        // The whole disk's rotational flag: the device itself, or its disk (sda1 -> sda,
        // nvme0n1p1 -> nvme0n1).
        let disk = if std::path::Path::new(&format!("/sys/block/{name}")).exists() {
            name.to_owned()
        } else {
            match name.rsplit_once('p') {
                Some((d, p))
                    if (d.starts_with("nvme") || d.starts_with("mmcblk"))
                        && !p.is_empty()
                        && p.bytes().all(|c| c.is_ascii_digit()) =>
                {
                    d.to_owned()
                }
                _ => name
                    .trim_end_matches(|c: char| c.is_ascii_digit())
                    .to_owned(),
            }
        };
        let file_type = match std::fs::read_to_string(format!("/sys/block/{disk}/queue/rotational"))
            .ok()
            .as_deref()
            .map(str::trim)
        {
            Some("0") => "SSD".to_owned(),
            Some("1") => "HDD".to_owned(),
            Some(other) => format!("Unknown({other})"),
            None => "Unknown(-1)".to_owned(),
        };
        let percent = if total == 0 {
            0.0
        } else {
            avail as f64 * 100.0 / total as f64
        };
        out.push(json!({
            "name": name,
            "percent_free": format!("{percent:.1}%"),
            "available_space": human(avail),
            "total_space": human(total),
            "file_system": fstype,
            "file_type": file_type,
        }));
    }
    out
}

pub fn top_level(ctx: &Ctx<'_>) -> Map<String, Value> {
    let mut info = Map::new();
    info.insert("now".into(), rfc3339(unix_now()).into());
    info.insert("os".into(), Value::Object(os_release()));
    info.insert("dmi".into(), dmi());
    let (used_ram, total_ram, used_swap, total_swap) = memory();
    info.insert(
        "system_info".into(),
        json!({
            "used_ram": human(used_ram),
            "total_ram": human(total_ram),
            "used_swap": human(used_swap),
            "total_swap": human(total_swap),
            "disks": disks(),
        }),
    );
    if let Some(c) = &ctx.identityd {
        if let aziot_identityd::config::Source::Manual {
            iothub_hostname, ..
        } = &c.provisioning.source
        {
            info.insert("iothub_hostname".into(), iothub_hostname.clone().into());
        }
        if let Some(gw) = &c.provisioning.local_gateway_hostname {
            info.insert("local_gateway_hostname".into(), gw.clone().into());
        }
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_784_023_200), "2026-07-14T10:00:00Z");
        assert_eq!(utc_display(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(human(8_192 * 1024 * 1024), "8.00 GiB");
    }
}
