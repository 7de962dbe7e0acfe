//! A deterministic byte stream, so a download can be checked byte for byte
//! without shipping the data: byte `i` depends only on `i`.

/// Byte `i` of the stream.
pub fn byte_at(i: u64) -> u8 {
    let x = (i ^ (i >> 11)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8
}

/// Fills `buf` with the stream starting at `offset`.
pub fn fill(offset: u64, buf: &mut [u8]) {
    for (k, b) in buf.iter_mut().enumerate() {
        *b = byte_at(offset + k as u64);
    }
}

/// FNV-1a 64 of the first `len` bytes of the stream: the hash a correct
/// download of `len` bytes must have.
pub fn expected_hash(len: u64) -> u64 {
    let mut h = Fnv::default();
    let mut buf = [0u8; 8192];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        fill(off, &mut buf[..n]);
        h.write(&buf[..n]);
        off += n as u64;
    }
    h.finish()
}

/// FNV-1a, 64 bits.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_is_deterministic_and_not_trivially_periodic() {
        let mut a = [0u8; 4096];
        let mut b = [0u8; 4096];
        fill(1000, &mut a);
        fill(1000, &mut b);
        assert_eq!(a, b);
        fill(1000 + 256, &mut b);
        assert_ne!(a, b);
        let mut h = Fnv::default();
        let mut all = vec![0u8; 100_000];
        fill(0, &mut all);
        h.write(&all);
        assert_eq!(h.finish(), expected_hash(100_000));
    }
}
