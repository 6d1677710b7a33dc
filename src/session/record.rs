//! How a session is stored. A user's sessions share one Redis string,
//! `{prefix}:sessions:{<userId>}`: Redis spends about 170 bytes on every key (dict entry, key,
//! object header, expiry entry), so one key per user rather than one per session plus an index
//! is what keeps a session under 400 bytes. The value is:
//!
//! ```text
//! value  = version:u8 (= 1)  record*
//! record = length:u16  body                      (length = body's length in bytes)
//! body   = session_id:[16]  expires_at:u48  last_active:u48  created_at:u48  details
//! details = platform:u8 ('w' | 'i' | 'a')  device_len:u8  device_id  ip_len:u8 (0 | 4 | 16)
//!           ip_address  user_agent               (the rest of the body)
//! ```
//!
//! Integers are big-endian, times are Unix milliseconds, the IP address is its 4 or 16 bytes,
//! an absent field is empty. The fixed-width fields come first so that the store's scripts find
//! a session and slide it in place (`SETRANGE`) without understanding the details, which only
//! this module reads and writes. Each session expires by its own `expires_at`; the key expires
//! with the user's longest-lived session.

use std::net::IpAddr;

use uuid::Uuid;

use crate::session::{Metadata, Platform};
use crate::store::StoreError;

/// The first byte of every value.
pub const VERSION: u8 = 1;
/// Bytes of a body before its details: session id and three times.
pub const FIXED: usize = 16 + 3 * 6;

/// A decoded body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub session_id: Uuid,
    pub expires_ms: u64,
    pub last_active_ms: u64,
    pub created_ms: u64,
    pub metadata: Metadata,
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("session record: {what}"))
}

fn read_u48(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .take(6)
        .fold(0, |n, b| (n << 8) | u64::from(*b))
}

fn write_u48(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(&n.to_be_bytes()[2..]);
}

fn platform_code(platform: Platform) -> u8 {
    match platform {
        Platform::Web => b'w',
        Platform::Ios => b'i',
        Platform::Android => b'a',
    }
}

fn platform_from_code(code: u8) -> Option<Platform> {
    match code {
        b'w' => Some(Platform::Web),
        b'i' => Some(Platform::Ios),
        b'a' => Some(Platform::Android),
        _ => None,
    }
}

/// The details of a new or updated session. A device id is at most 255 bytes (the API allows
/// far less); a longer one is refused rather than cut.
pub fn details(metadata: &Metadata) -> Result<Vec<u8>, StoreError> {
    let device = metadata.device_id.as_deref().unwrap_or("").as_bytes();
    let ua = metadata.user_agent.as_deref().unwrap_or("").as_bytes();
    let device_len = u8::try_from(device.len()).map_err(|_| corrupt("device id too long"))?;
    let mut out = Vec::with_capacity(3 + device.len() + 16 + ua.len());
    out.push(platform_code(metadata.platform));
    out.push(device_len);
    out.extend_from_slice(device);
    match metadata.ip_address {
        None => out.push(0),
        Some(IpAddr::V4(ip)) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        Some(IpAddr::V6(ip)) => {
            out.push(16);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(ua);
    if FIXED + out.len() > usize::from(u16::MAX) {
        return Err(corrupt("too long"));
    }
    Ok(out)
}

/// A whole body; the store's scripts build these themselves, this is for tests and tools.
pub fn body(record: &Record) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(FIXED + 160);
    out.extend_from_slice(record.session_id.as_bytes());
    write_u48(&mut out, record.expires_ms);
    write_u48(&mut out, record.last_active_ms);
    write_u48(&mut out, record.created_ms);
    out.extend_from_slice(&details(&record.metadata)?);
    Ok(out)
}

/// A body's fields, each checked, none copied.
struct Fields<'a> {
    session_id: Uuid,
    platform: Platform,
    device_id: &'a str,
    ip_address: Option<IpAddr>,
    user_agent: &'a str,
}

fn fields(body: &[u8]) -> Result<Fields<'_>, StoreError> {
    if body.len() < FIXED + 3 {
        return Err(corrupt("truncated"));
    }
    let (fixed, details) = body.split_at(FIXED);
    let session_id = Uuid::from_slice(&fixed[..16]).map_err(|_| corrupt("session id"))?;
    let platform = platform_from_code(details[0]).ok_or_else(|| corrupt("unknown platform"))?;
    let mut rest = &details[1..];
    let mut field = |what: &str| -> Result<&[u8], StoreError> {
        let (&len, tail) = rest.split_first().ok_or_else(|| corrupt(what))?;
        let len = usize::from(len);
        let bytes = tail.get(..len).ok_or_else(|| corrupt(what))?;
        rest = &tail[len..];
        Ok(bytes)
    };
    let device_id = std::str::from_utf8(field("device id")?).map_err(|_| corrupt("device id"))?;
    let ip_address = match field("IP address")? {
        [] => None,
        &[a, b, c, d] => Some(IpAddr::from([a, b, c, d])),
        bytes => Some(IpAddr::from(
            <[u8; 16]>::try_from(bytes).map_err(|_| corrupt("IP address"))?,
        )),
    };
    let user_agent = std::str::from_utf8(rest).map_err(|_| corrupt("user agent"))?;
    Ok(Fields {
        session_id,
        platform,
        device_id,
        ip_address,
        user_agent,
    })
}

/// The platform of a body, once the whole body is known to be readable: a session the API
/// cannot read is not admitted on proxied routes either. Nothing is copied.
pub fn platform(body: &[u8]) -> Result<Platform, StoreError> {
    fields(body).map(|fields| fields.platform)
}

/// Reads one body.
pub fn decode(body: &[u8]) -> Result<Record, StoreError> {
    let Fields {
        session_id,
        platform,
        device_id,
        ip_address,
        user_agent,
    } = fields(body)?;
    Ok(Record {
        session_id,
        expires_ms: read_u48(&body[16..22]),
        last_active_ms: read_u48(&body[22..28]),
        created_ms: read_u48(&body[28..34]),
        metadata: Metadata {
            platform,
            user_agent: (!user_agent.is_empty()).then(|| user_agent.to_string()),
            ip_address,
            device_id: (!device_id.is_empty()).then(|| device_id.to_string()),
        },
    })
}

/// Splits a whole value into its bodies (for tests and tools; the scripts do this in Redis).
pub fn bodies(value: &[u8]) -> Result<Vec<&[u8]>, StoreError> {
    let (&version, mut rest) = value.split_first().ok_or_else(|| corrupt("empty value"))?;
    if version != VERSION {
        return Err(corrupt("unknown version"));
    }
    let mut out = Vec::new();
    while !rest.is_empty() {
        let len = rest
            .get(..2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
            .ok_or_else(|| corrupt("truncated length"))?;
        let body = rest
            .get(2..2 + len)
            .ok_or_else(|| corrupt("truncated body"))?;
        out.push(body);
        rest = &rest[2 + len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record {
            session_id: Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
            expires_ms: 1_800_000_000_123,
            last_active_ms: 1_700_000_500_000,
            created_ms: 1_700_000_000_000,
            metadata: Metadata {
                platform: Platform::Android,
                user_agent: Some("Game|1.0 (Android)".into()),
                ip_address: Some("2001:db8::1".parse().unwrap()),
                device_id: Some("dev-42".into()),
            },
        }
    }

    #[test]
    fn a_body_round_trips() {
        let record = sample();
        let body = body(&record).unwrap();
        assert_eq!(decode(&body).unwrap(), record);
        assert_eq!(platform(&body).unwrap(), Platform::Android);
    }

    #[test]
    fn the_layout_is_the_documented_one() {
        let body = body(&sample()).unwrap();
        assert_eq!(&body[..16], sample().session_id.as_bytes());
        assert_eq!(body[16..22], 1_800_000_000_123u64.to_be_bytes()[2..]);
        assert_eq!(body[22..28], 1_700_000_500_000u64.to_be_bytes()[2..]);
        assert_eq!(body[28..34], 1_700_000_000_000u64.to_be_bytes()[2..]);
        assert_eq!(body[34], b'a');
        assert_eq!(&body[35..42], b"\x06dev-42");
        assert_eq!(body[42], 16);
        assert_eq!(
            body[43..59],
            "2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!(&body[59..], b"Game|1.0 (Android)");
    }

    #[test]
    fn an_ipv4_address_takes_four_bytes() {
        let mut record = sample();
        record.metadata.ip_address = Some([203, 0, 113, 9].into());
        let body = body(&record).unwrap();
        assert_eq!(&body[42..47], &[4, 203, 0, 113, 9]);
        assert_eq!(decode(&body).unwrap(), record);
    }

    #[test]
    fn absent_metadata_fields_stay_absent() {
        let mut record = sample();
        record.metadata = Metadata {
            platform: Platform::Web,
            user_agent: None,
            ip_address: None,
            device_id: None,
        };
        let body = body(&record).unwrap();
        assert_eq!(body.len(), FIXED + 3);
        assert_eq!(decode(&body).unwrap(), record);
    }

    #[test]
    fn a_value_splits_into_its_bodies() {
        let one = body(&sample()).unwrap();
        let mut value = vec![VERSION];
        for _ in 0..2 {
            value.extend_from_slice(&u16::try_from(one.len()).unwrap().to_be_bytes());
            value.extend_from_slice(&one);
        }
        assert_eq!(bodies(&value).unwrap(), vec![&one[..], &one[..]]);
        assert!(bodies(&value[..value.len() - 1]).is_err());
        assert!(bodies(&[2]).is_err(), "unknown version");
        assert!(bodies(&[]).is_err());
        assert_eq!(bodies(&[VERSION]).unwrap(), Vec::<&[u8]>::new());
    }

    #[test]
    fn garbage_is_reported_not_panicked_on() {
        let good = body(&sample()).unwrap();
        let mut bad_platform = good.clone();
        bad_platform[34] = b'z';
        let mut long_device = good.clone();
        long_device[35] = 250;
        for body in [
            &[][..],
            &good[..20],
            &good[..FIXED + 2],
            &bad_platform,
            &long_device,
        ] {
            assert!(decode(body).is_err(), "{body:?}");
        }
        assert!(platform(&good[..FIXED]).is_err());
    }

    #[test]
    fn oversized_fields_are_refused_not_cut() {
        let mut record = sample();
        record.metadata.device_id = Some("d".repeat(256));
        assert!(details(&record.metadata).is_err());
        record.metadata.device_id = Some("d".repeat(255));
        assert!(details(&record.metadata).is_ok());
    }
}
