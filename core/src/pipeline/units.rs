//! Durations (`30m`, `1h30m`, `7d`) and Kubernetes-style quantities (`500m` CPU, `2Gi` memory).

/// Parses a duration such as `30m`, `1h30m`, `45s` or `7d` into whole seconds.
///
/// A unit is required: a bare `30` is ambiguous (seconds? minutes?) and is refused.
pub(crate) fn parse_duration(text: &str, max_secs: u64) -> Result<u64, String> {
    let t = text.trim();
    if !t.is_empty() && t.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "duration `{t}` has no unit; write it with one, such as {t}m or {t}s"
        ));
    }
    let d = humantime::parse_duration(t).map_err(|_| {
        format!("invalid duration `{t}`; write a number and a unit, such as 30m, 1h30m, 45s or 7d")
    })?;
    let secs = d.as_secs();
    if secs == 0 {
        return Err(format!(
            "duration `{t}` is shorter than a second; use at least 1s"
        ));
    }
    if secs > max_secs {
        return Err(format!(
            "duration `{t}` is longer than the limit of {}; shorten it",
            format_duration(max_secs)
        ));
    }
    Ok(secs)
}

/// Formats seconds the way pipelines write them: `1h 30m`, `7days`.
pub(crate) fn format_duration(secs: u64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
}

/// Most CPU a job may ask for: 256 cores.
const MAX_CPU_MILLIS: u64 = 256_000;
/// Most memory a job may ask for: 4 TiB.
const MAX_MEMORY_BYTES: u64 = 4 << 40;
/// Least memory that can be meant seriously; smaller values are almost always a missing unit.
const MIN_MEMORY_BYTES: u64 = 4 << 20;

/// Parses a CPU quantity (`1`, `0.5`, `2.25`, `500m`) into millicores.
pub(crate) fn parse_cpu(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let bad = || {
        format!(
            "invalid CPU quantity `{t}`; write cores such as 2 or 0.5, or millicores such as 500m"
        )
    };
    let millis = if let Some(m) = t.strip_suffix('m') {
        if m.is_empty() || !m.chars().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        m.parse::<u64>().map_err(|_| bad())?
    } else {
        let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
        let digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
        if whole.is_empty() && frac.is_empty() || !digits(whole) || !digits(frac) {
            return Err(bad());
        }
        if frac.len() > 3 {
            return Err(format!(
                "CPU quantity `{t}` is finer than a millicore; use at most three decimals"
            ));
        }
        let whole: u64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| bad())?
        };
        let frac_millis: u64 = format!("{frac:0<3}").parse().map_err(|_| bad())?;
        whole
            .checked_mul(1000)
            .and_then(|w| w.checked_add(frac_millis))
            .ok_or_else(bad)?
    };
    if millis == 0 {
        return Err(format!("CPU quantity `{t}` is zero; ask for at least 1m"));
    }
    if millis > MAX_CPU_MILLIS {
        return Err(format!(
            "CPU quantity `{t}` is more than the limit of 256 cores"
        ));
    }
    Ok(millis)
}

/// Parses a memory quantity (`512Mi`, `2Gi`, `1G`, `1500M`) into bytes.
pub(crate) fn parse_memory(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let bad = || {
        format!(
            "invalid memory quantity `{t}`; write a whole number and a unit, such as 512Mi or 2Gi"
        )
    };
    if num.is_empty() {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "m" | "mi" | "MB" | "MiB" => {
            return Err(format!(
                "invalid memory unit in `{t}`; did you mean {num}Mi? Units are Ki, Mi, Gi, Ti (or k, M, G, T)"
            ));
        }
        "g" | "gi" | "GB" | "GiB" => {
            return Err(format!(
                "invalid memory unit in `{t}`; did you mean {num}Gi? Units are Ki, Mi, Gi, Ti (or k, M, G, T)"
            ));
        }
        _ => return Err(bad()),
    };
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("memory quantity `{t}` is too large"))?;
    if bytes < MIN_MEMORY_BYTES {
        return Err(format!(
            "memory quantity `{t}` is only {bytes} bytes; add a unit, such as {num}Mi"
        ));
    }
    if bytes > MAX_MEMORY_BYTES {
        return Err(format!(
            "memory quantity `{t}` is more than the limit of 4Ti"
        ));
    }
    Ok(bytes)
}

/// Formats millicores as Kubernetes writes them: `2` or `500m`.
pub(crate) fn format_cpu(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        (millis / 1000).to_string()
    } else {
        format!("{millis}m")
    }
}

/// Formats bytes with the largest binary unit that divides them exactly.
pub(crate) fn format_memory(bytes: u64) -> String {
    for (unit, size) in [
        ("Ti", 1u64 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ] {
        if bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    #[test]
    fn durations_need_a_unit_and_a_sane_size() {
        assert_eq!(parse_duration("30m", DAY), Ok(1800));
        assert_eq!(parse_duration("1h30m", DAY), Ok(5400));
        assert_eq!(parse_duration("7d", 30 * DAY), Ok(7 * DAY));
        assert!(parse_duration("30", DAY).unwrap_err().contains("30m"));
        assert!(
            parse_duration("30 minutes please", DAY)
                .unwrap_err()
                .starts_with("invalid duration")
        );
        assert!(parse_duration("0s", DAY).is_err());
        assert!(
            parse_duration("2d", DAY)
                .unwrap_err()
                .contains("limit of 1day")
        );
    }

    #[test]
    fn cpu_quantities_become_millicores() {
        assert_eq!(parse_cpu("1"), Ok(1000));
        assert_eq!(parse_cpu("0.5"), Ok(500));
        assert_eq!(parse_cpu(".25"), Ok(250));
        assert_eq!(parse_cpu("250m"), Ok(250));
        assert!(parse_cpu("0").is_err());
        assert!(parse_cpu("1.0005").is_err());
        assert!(parse_cpu("two").is_err());
        assert!(parse_cpu("-1").is_err());
        assert!(parse_cpu("300").is_err());
        assert_eq!(format_cpu(1500), "1500m");
        assert_eq!(format_cpu(2000), "2");
    }

    #[test]
    fn memory_quantities_become_bytes_and_a_missing_unit_is_caught() {
        assert_eq!(parse_memory("2Gi"), Ok(2 << 30));
        assert_eq!(parse_memory("512Mi"), Ok(512 << 20));
        assert_eq!(parse_memory("1G"), Ok(1_000_000_000));
        assert!(parse_memory("512").unwrap_err().contains("512Mi"));
        assert!(parse_memory("2GB").unwrap_err().contains("2Gi"));
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("99999999999999999999Ti").is_err());
        assert_eq!(format_memory(2 << 30), "2Gi");
        assert_eq!(format_memory(1_000_000_000), "1000000000");
    }
}
