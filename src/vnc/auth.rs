//! VNC authentication (RFB security type 2): the server sends a random
//! 16-byte challenge; the viewer answers it DES-encrypted with the password
//! (its first 8 bytes, zero-padded) as the key, each key byte bit-reversed
//! as the original implementation did.
//!
//! This keeps casual viewers out; it is not strong (DES, 8 characters). On a
//! network, tunnel the port (ssh -L) or use `unix:PATH`.

use des::cipher::{BlockEncrypt, KeyInit};
use des::Des;

/// The password, as the key it becomes.
#[derive(Clone)]
pub struct VncPassword {
    key: [u8; 8],
}

impl std::fmt::Debug for VncPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VncPassword(..)")
    }
}

impl VncPassword {
    /// The first line of a password file (at most 8 bytes are used, as
    /// every VNC viewer does).
    pub fn from_file_contents(text: &str) -> Option<VncPassword> {
        let line = text.lines().next()?.trim_end_matches('\r');
        if line.is_empty() {
            return None;
        }
        let mut key = [0u8; 8];
        for (k, b) in key.iter_mut().zip(line.bytes()) {
            *k = b.reverse_bits();
        }
        Some(VncPassword { key })
    }

    /// The answer a viewer knowing the password gives to `challenge`.
    pub fn response(&self, challenge: &[u8; 16]) -> [u8; 16] {
        let cipher = Des::new(&self.key.into());
        let mut out = *challenge;
        for block in out.chunks_exact_mut(8) {
            cipher.encrypt_block(block.into());
        }
        out
    }

    /// Whether `answer` is the right response, compared in constant time.
    pub fn check(&self, challenge: &[u8; 16], answer: &[u8; 16]) -> bool {
        let want = self.response(challenge);
        want.iter()
            .zip(answer)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// A fresh random challenge (getrandom(2), allowed under the sandbox).
pub fn challenge() -> std::io::Result<[u8; 16]> {
    let mut c = [0u8; 16];
    // SAFETY: getrandom(2) writes at most `c.len()` bytes into `c`.
    let n = unsafe { libc::getrandom(c.as_mut_ptr().cast(), c.len(), 0) };
    if n != c.len() as isize {
        return Err(std::io::Error::last_os_error());
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses() {
        let p = VncPassword::from_file_contents("secret99extra\nignored").unwrap();
        let q = VncPassword::from_file_contents("secret99").unwrap();
        let c = [7u8; 16];
        assert_eq!(p.response(&c), q.response(&c));
        assert!(p.check(&c, &q.response(&c)));
        let other = VncPassword::from_file_contents("secret98").unwrap();
        assert!(!p.check(&c, &other.response(&c)));
        assert!(VncPassword::from_file_contents("\n").is_none());
        assert_ne!(challenge().unwrap(), challenge().unwrap());
    }
}
