//! Small value types of the super-config: renewal policies, connection strings and base64 keys.

use std::fmt;

use base64::Engine as _;
use zeroize::Zeroizing;

/// A renewal policy string: `<n>%`, `<n>min` or `<n>day` (spec aziotctl.md §2.5.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// A percentage of the certificate lifetime, 1 to 99.
    Percentage(u64),
    /// A time, in minutes.
    Minutes(u64),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy not specified")]
    Empty,
    #[error("bad units for policy")]
    BadUnits,
    #[error("policy could not be parsed as number")]
    NotANumber,
    #[error("renewal policy values must be positive")]
    NotPositive,
    #[error("lifetime percentage must be less than 100")]
    PercentageTooLarge,
}

const MINUTES_PER_DAY: u64 = 24 * 60;

impl std::str::FromStr for Policy {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(PolicyError::Empty);
        }
        let (number, multiplier) = if let Some(n) = s.strip_suffix('%') {
            (n, None)
        } else if let Some(n) = s.strip_suffix("min") {
            (n, Some(1))
        } else if let Some(n) = s.strip_suffix("day") {
            (n, Some(MINUTES_PER_DAY))
        } else {
            return Err(PolicyError::BadUnits);
        };
        let number: i64 = number.parse().map_err(|_| PolicyError::NotANumber)?;
        let number = u64::try_from(number)
            .ok()
            .filter(|n| *n > 0)
            .ok_or(PolicyError::NotPositive)?;
        match multiplier {
            None if number >= 100 => Err(PolicyError::PercentageTooLarge),
            None => Ok(Policy::Percentage(number)),
            Some(m) => number
                .checked_mul(m)
                .map(Policy::Minutes)
                .ok_or(PolicyError::NotANumber),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::Percentage(p) => write!(f, "{p}%"),
            Policy::Minutes(m) if m % MINUTES_PER_DAY == 0 => {
                write!(f, "{}day", m / MINUTES_PER_DAY)
            }
            Policy::Minutes(m) => write!(f, "{m}min"),
        }
    }
}

/// Decodes a base64 symmetric key: standard alphabet, padded or not (spec aziotctl.md §2.6.3).
pub fn decode_key(encoded: &str) -> Result<Zeroizing<Vec<u8>>, base64::DecodeError> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
    match STANDARD.decode(encoded) {
        Ok(key) => Ok(Zeroizing::new(key)),
        Err(base64::DecodeError::InvalidPadding) => {
            STANDARD_NO_PAD.decode(encoded).map(Zeroizing::new)
        }
        Err(e) => Err(e),
    }
}

/// An IoT Hub device connection string.
pub struct ConnectionString {
    pub host_name: String,
    pub device_id: String,
    pub key: Zeroizing<Vec<u8>>,
    /// Names of the parameters that were present but are not used.
    pub ignored: Vec<String>,
    /// How many `;`-separated parts had no `=` (and were ignored).
    pub malformed_parts: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectionStringError {
    #[error("required parameter \"{0}\" is missing")]
    Missing(&'static str),
    #[error(
        "connection string's \"SharedAccessKey\" parameter could not be decoded from base64: {0}"
    )]
    Base64(base64::DecodeError),
}

impl ConnectionString {
    /// Splits on `;`, each part at its first `=`; keys are case-sensitive, values untrimmed.
    pub fn parse(s: &str) -> Result<Self, ConnectionStringError> {
        let mut host_name = None;
        let mut device_id = None;
        let mut key = None;
        let mut ignored = Vec::new();
        let mut malformed_parts = 0;
        for part in s.split(';').filter(|p| !p.is_empty()) {
            let Some((name, value)) = part.split_once('=') else {
                malformed_parts += 1;
                continue;
            };
            match name {
                "HostName" => host_name = Some(value),
                "DeviceId" => device_id = Some(value),
                "SharedAccessKey" => key = Some(value),
                other => ignored.push(other.to_owned()),
            }
        }
        let host_name = host_name.ok_or(ConnectionStringError::Missing("HostName"))?;
        let device_id = device_id.ok_or(ConnectionStringError::Missing("DeviceId"))?;
        let key = key.ok_or(ConnectionStringError::Missing("SharedAccessKey"))?;
        let key = decode_key(key).map_err(ConnectionStringError::Base64)?;
        Ok(ConnectionString {
            host_name: host_name.to_owned(),
            device_id: device_id.to_owned(),
            key,
            ignored,
            malformed_parts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies() {
        let p = |s: &str| s.parse::<Policy>();
        assert_eq!(p("80%"), Ok(Policy::Percentage(80)));
        assert_eq!(p("1440min").unwrap().to_string(), "1day");
        assert_eq!(p("90min").unwrap().to_string(), "90min");
        assert_eq!(p("2day").unwrap().to_string(), "2day");
        assert_eq!(p(""), Err(PolicyError::Empty));
        assert_eq!(p("5h"), Err(PolicyError::BadUnits));
        assert_eq!(p("x%"), Err(PolicyError::NotANumber));
        assert_eq!(p("0min"), Err(PolicyError::NotPositive));
        assert_eq!(p("-3day"), Err(PolicyError::NotPositive));
        assert_eq!(p("100%"), Err(PolicyError::PercentageTooLarge));
        assert_eq!(p("99999999999999999day"), Err(PolicyError::NotANumber));
    }

    #[test]
    fn keys_decode_with_or_without_padding() {
        assert_eq!(&decode_key("YWJjZA==").unwrap()[..], b"abcd");
        assert_eq!(&decode_key("YWJjZA").unwrap()[..], b"abcd");
        assert!(decode_key("YW*j").is_err());
    }

    #[test]
    fn connection_strings() {
        let cs = ConnectionString::parse(
            "HostName=h;DeviceId=d=x;SharedAccessKey=YWJjZA==;GatewayHostName=g;junk;",
        )
        .unwrap();
        assert_eq!((cs.host_name.as_str(), cs.device_id.as_str()), ("h", "d=x"));
        assert_eq!(&cs.key[..], b"abcd");
        assert_eq!(cs.ignored, ["GatewayHostName"]);
        assert_eq!(cs.malformed_parts, 1);
        let e = |s: &str| ConnectionString::parse(s).err().unwrap().to_string();
        assert_eq!(
            e("DeviceId=d;SharedAccessKey=YQ=="),
            "required parameter \"HostName\" is missing"
        );
        assert_eq!(
            e("HostName=h;SharedAccessKey=YQ=="),
            "required parameter \"DeviceId\" is missing"
        );
        assert_eq!(
            e("HostName=h;DeviceId=d"),
            "required parameter \"SharedAccessKey\" is missing"
        );
        assert!(e("HostName=h;DeviceId=d;SharedAccessKey=*").starts_with(
            "connection string's \"SharedAccessKey\" parameter could not be decoded from base64: "
        ));
    }
}
