//! A small, fast generator for offsets and payload bytes (xorshift64*). Not for anything
//! that needs unpredictability.

pub struct Rng(u64);

impl Rng {
    pub fn new() -> Rng {
        Rng::seeded(rand::random())
    }

    pub fn seeded(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n` > 0; the modulo bias is irrelevant at these sizes).
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        self.next_u64() % n
    }

    /// Fill `buf` with data of which about `compress_pct`% is random and the rest zeros, in
    /// runs within every 512-byte chunk (ACT's compress-pct: 100 = incompressible).
    pub fn fill(&mut self, buf: &mut [u8], compress_pct: u32) {
        let random_per_chunk = 512 * compress_pct.min(100) as usize / 100;
        for chunk in buf.chunks_mut(512) {
            let n = random_per_chunk.min(chunk.len());
            for word in chunk[..n].chunks_mut(8) {
                let v = self.next_u64().to_le_bytes();
                word.copy_from_slice(&v[..word.len()]);
            }
            chunk[n..].fill(0);
        }
    }
}

impl Default for Rng {
    fn default() -> Self {
        Rng::new()
    }
}
