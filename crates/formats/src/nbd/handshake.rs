//! Handshake: the server greeting and the client's flags.

use super::*;

// ---------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------

/// The server's first message in the newstyle handshake (18 bytes).
///
/// ```text
/// offset size field
///      0    8 NBDMAGIC  0x4e42444d41474943 ("NBDMAGIC")
///      8    8 IHAVEOPT  0x49484156454f5054 ("IHAVEOPT"): newstyle, not oldstyle
///     16    2 handshake flags (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    pub handshake_flags: u16,
}

impl Greeting {
    pub const LEN: usize = 18;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[16..18].copy_from_slice(&self.handshake_flags.to_be_bytes());
        b
    }

    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf, "greeting");
        let m = r.u64()?;
        if m != NBDMAGIC {
            return Err(WireError::BadMagic { what: "greeting", found: m, expected: NBDMAGIC });
        }
        let m = r.u64()?;
        if m != IHAVEOPT {
            return Err(WireError::BadMagic { what: "greeting (newstyle)", found: m, expected: IHAVEOPT });
        }
        Ok(Greeting { handshake_flags: r.u16()? })
    }
}

/// The client's answer to the greeting (4 bytes): its flags.
///
/// ```text
/// offset size field
///      0    4 client flags: bit 0 FLAG_C_FIXED_NEWSTYLE, bit 1 FLAG_C_NO_ZEROES
/// ```
///
/// A server must drop the connection if any other bit is set, or a bit it did not offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags(pub u32);

impl ClientFlags {
    pub const LEN: usize = 4;

    pub fn encode(&self) -> [u8; Self::LEN] {
        self.0.to_be_bytes()
    }

    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        Ok(ClientFlags(Reader::new(buf, "client flags").u32()?))
    }

    pub fn fixed_newstyle(self) -> bool {
        self.0 & FLAG_C_FIXED_NEWSTYLE != 0
    }

    pub fn no_zeroes(self) -> bool {
        self.0 & FLAG_C_NO_ZEROES != 0
    }

    /// Bits set that are not in `offered` (the server's handshake flags, as client bits).
    pub fn unknown_bits(self, offered: u16) -> u32 {
        self.0 & !u32::from(offered)
    }
}
