//! The `Release` file of a suite: its identity, components and the SHA256 list of
//! the index files it vouches for.

use std::collections::HashMap;
use std::time::SystemTime;

use super::deb822;

/// One line of the `SHA256:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub sha256: String,
    pub size: u64,
}

/// A parsed Release file.
#[derive(Debug, Clone)]
pub struct Release {
    pub suite: Option<String>,
    pub codename: Option<String>,
    pub components: Vec<String>,
    pub architectures: Vec<String>,
    pub acquire_by_hash: bool,
    pub date: Option<SystemTime>,
    pub valid_until: Option<SystemTime>,
    /// `Packages` of `binary-ARCH` already holds `Architecture: all` stanzas.
    pub no_support_for_arch_all: bool,
    pub sha256: HashMap<String, IndexEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("Release file has no paragraph")]
    Empty,
    #[error("Release file has no SHA256 section; weaker checksums are not accepted")]
    NoSha256,
    #[error("Release file: bad SHA256 line {0:?}")]
    BadLine(String),
}

impl Release {
    pub fn parse(text: &str) -> Result<Release, ReleaseError> {
        let p = deb822::paragraphs(text).next().ok_or(ReleaseError::Empty)?;
        let words = |name: &str| -> Vec<String> {
            p.get(name)
                .unwrap_or("")
                .split_whitespace()
                .map(str::to_string)
                .collect()
        };
        let mut sha256 = HashMap::new();
        let section = p.get("SHA256").ok_or(ReleaseError::NoSha256)?;
        for line in deb822::lines(section) {
            let mut w = line.split_whitespace();
            let (Some(h), Some(s), Some(path), None) = (w.next(), w.next(), w.next(), w.next())
            else {
                return Err(ReleaseError::BadLine(line.to_string()));
            };
            let size = s
                .parse()
                .map_err(|_| ReleaseError::BadLine(line.to_string()))?;
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ReleaseError::BadLine(line.to_string()));
            }
            sha256.insert(
                path.to_string(),
                IndexEntry {
                    sha256: h.to_ascii_lowercase(),
                    size,
                },
            );
        }
        Ok(Release {
            suite: p.get("Suite").map(str::to_string),
            codename: p.get("Codename").map(str::to_string),
            components: words("Components"),
            architectures: words("Architectures"),
            acquire_by_hash: p
                .get("Acquire-By-Hash")
                .is_some_and(|v| v.eq_ignore_ascii_case("yes")),
            date: p.get("Date").and_then(parse_rfc2822),
            valid_until: p.get("Valid-Until").and_then(parse_rfc2822),
            no_support_for_arch_all: p
                .get("No-Support-for-Architecture-all")
                .is_some_and(|v| v.trim() == "Packages"),
            sha256,
        })
    }

    /// Whether this Release describes `suite` (by `Suite:` or `Codename:`).
    pub fn matches_suite(&self, suite: &str) -> bool {
        self.suite.as_deref() == Some(suite) || self.codename.as_deref() == Some(suite)
    }
}

/// Parses the date format archives use: `Sat, 11 Jul 2026 09:12:44 UTC`
/// (RFC 2822 with a `UTC`/`GMT`/`+0000` zone).
pub fn parse_rfc2822(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    let s = s.split_once(", ").map_or(s, |(_, r)| r);
    let mut w = s.split_whitespace();
    let day: u64 = w.next()?.parse().ok()?;
    let month = match w.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = w.next()?.parse().ok()?;
    let mut t = w.next()?.split(':');
    let (h, m, sec): (u64, u64, u64) = (
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
    );
    let offset_secs: i64 = match w.next() {
        None | Some("UTC") | Some("GMT") | Some("Z") => 0,
        Some(z) if z.len() == 5 && (z.starts_with('+') || z.starts_with('-')) => {
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let hh: i64 = z[1..3].parse().ok()?;
            let mm: i64 = z[3..5].parse().ok()?;
            sign * (hh * 3600 + mm * 60)
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day as i64);
    let secs = days * 86400 + (h * 3600 + m * 60 + sec) as i64 - offset_secs;
    let secs = u64::try_from(secs).ok()?;
    Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// Formats a time the way Release files do (used by test archives).
pub fn format_rfc2822(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // civil_from_days
    let z = days + 719468;
    let era = if z >= 0 { z } else { z - 146096 } / 146097;
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    let wd = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    const WD: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MO: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} UTC",
        WD[wd],
        d,
        MO[(m - 1) as usize],
        y,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Origin: Debian\nSuite: oldstable\nCodename: bookworm\n\
Date: Sat, 11 Jul 2026 09:12:44 UTC\nValid-Until: Sat, 18 Jul 2026 09:12:44 UTC\n\
Acquire-By-Hash: yes\nNo-Support-for-Architecture-all: Packages\n\
Architectures: all amd64 arm64\nComponents: main contrib\nDescription: x\nMD5Sum:\n \
0123 10 main/binary-amd64/Packages\nSHA256:\n \
0000000000000000000000000000000000000000000000000000000000000001 1234 main/binary-amd64/Packages.xz\n \
00000000000000000000000000000000000000000000000000000000000000AA 50060337 main/binary-amd64/Packages\n";

    #[test]
    fn parses_release() {
        let r = Release::parse(SAMPLE).unwrap();
        assert!(r.matches_suite("bookworm") && r.matches_suite("oldstable"));
        assert!(!r.matches_suite("trixie"));
        assert!(r.acquire_by_hash && r.no_support_for_arch_all);
        assert_eq!(r.components, vec!["main", "contrib"]);
        let e = &r.sha256["main/binary-amd64/Packages"];
        assert_eq!(e.size, 50060337);
        assert!(e.sha256.ends_with("aa"));
        let d = r.date.unwrap();
        assert_eq!(format_rfc2822(d), "Sat, 11 Jul 2026 09:12:44 UTC");
        assert_eq!(
            r.valid_until.unwrap().duration_since(d).unwrap().as_secs(),
            7 * 86400
        );
    }

    #[test]
    fn rejects_missing_sha256_and_bad_lines() {
        assert!(matches!(
            Release::parse("Suite: x\nMD5Sum:\n 00 1 a\n"),
            Err(ReleaseError::NoSha256)
        ));
        assert!(matches!(
            Release::parse("Suite: x\nSHA256:\n zz 1 a\n"),
            Err(ReleaseError::BadLine(_))
        ));
    }

    #[test]
    fn dates_with_offsets() {
        let a = parse_rfc2822("Mon, 01 Jan 2024 01:00:00 +0100").unwrap();
        let b = parse_rfc2822("Mon, 01 Jan 2024 00:00:00 UTC").unwrap();
        assert_eq!(a, b);
        assert_eq!(format_rfc2822(b), "Mon, 01 Jan 2024 00:00:00 UTC");
    }
}
