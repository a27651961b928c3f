//! What a process holds, read from `/proc/self`: descriptors, segment
//! mappings, memory and CPU time — the figures the leak and bound tests
//! compare before and after.

/// Open descriptors of this process (not counting the directory handle
/// used to list `/proc/self/fd`).
pub fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(1).saturating_sub(1)
}

/// Mappings of transport segments (`memfd:coroipc` in `/proc/self/maps`):
/// (count, bytes).
pub fn memfd_maps() -> (u64, u64) {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut count = 0;
    let mut bytes = 0;
    for line in maps.lines().filter(|l| l.contains("memfd:coroipc")) {
        if let Some((a, b)) = line.split_whitespace().next().and_then(|r| r.split_once('-')) {
            let a = u64::from_str_radix(a, 16).unwrap_or(0);
            let b = u64::from_str_radix(b, 16).unwrap_or(0);
            count += 1;
            bytes += b.saturating_sub(a);
        }
    }
    (count, bytes)
}

/// A numeric field of `/proc/self/status` (kB fields in kB: `RssShmem`,
/// `RssAnon`, `VmSize`; counts as is: `Threads`).
pub fn status_field(name: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// User + system CPU time of this process in ms (`/proc/self/stat`, 100
/// ticks per second as on every Linux this runs on).
pub fn cpu_ms() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // utime and stime are the 14th and 15th fields; count after the
    // parenthesised command name, which may contain spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) * 10
}
