//! Source prefixes expanded into the filter's multibit tables
//! (`supervisor_common::xdp::prefix_table`): what one longest-prefix-match lookup in
//! a trie answers, as a walk of array reads the verifier inlines. One expansion for
//! both families: an address of `N` bytes has a 16-bit first level and chunks of 8
//! bits below it; the IPv6 table also compresses runs of bytes in which the prefixes
//! below an entry do not branch into one `PrefixSkip`.

use supervisor_common::xdp::{
    MAX_V4_CHUNKS, MAX_V6_CHUNKS, MAX_V6_SKIPS, PrefixSkip, prefix_table,
};

const CHUNK_ENTRIES: usize = prefix_table::CHUNK_ENTRIES as usize;

/// The expanded table, ready to be written into fresh maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefixTable {
    /// The non-zero first-level entries (index, value), the /0 verdict at
    /// `prefix_table::DEFAULT_INDEX` among them when there is one.
    pub first: Vec<(u32, u32)>,
    /// Chunks; chunk `n` is entries `n * 256 ..` of the family's chunk table.
    pub chunks: Vec<[u32; CHUNK_ENTRIES]>,
    /// Skips (IPv6 only); skip `n` is entry `n` of the skip table.
    pub skips: Vec<PrefixSkip>,
    /// Whether some entry says `prefix_table::ASK_TRIE`: then the trie must hold
    /// every prefix.
    pub asks_trie: bool,
}

impl PrefixTable {
    /// The non-zero chunk entries as (index in the chunk table, value).
    pub fn chunk_entries(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.chunks.iter().enumerate().flat_map(|(n, chunk)| {
            let base = n as u32 * prefix_table::CHUNK_ENTRIES;
            chunk
                .iter()
                .enumerate()
                .filter(|(_, v)| **v != 0)
                .map(move |(i, v)| (base + i as u32, *v))
        })
    }
}

/// How much one table may hold, and what to do beyond it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub chunks: u32,
    /// 0: the table has no skips (IPv4: its walk is at most three reads anyway).
    pub skips: u32,
    pub when_full: WhenFull,
}

/// What to do with prefixes that need a chunk or a skip when none is left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenFull {
    /// Refuse the ruleset (IPv4: no trie behind the table).
    Refuse,
    /// Mark the entry they hang from `ASK_TRIE` (IPv6).
    AskTrie,
}

/// The IPv4 table: no skips, and no trie behind it.
pub const V4_CAPACITY: Capacity = Capacity {
    chunks: MAX_V4_CHUNKS,
    skips: 0,
    when_full: WhenFull::Refuse,
};

/// The IPv6 table: the trie takes what does not fit.
pub const V6_CAPACITY: Capacity = Capacity {
    chunks: MAX_V6_CHUNKS,
    skips: MAX_V6_SKIPS,
    when_full: WhenFull::AskTrie,
};

type Prefix<const N: usize> = (u32, [u8; N], u32);

/// Expands (prefix length, address, verdict) entries, whose overlaps already say
/// what the longest match should answer. With [`WhenFull::Refuse`], fails (saying
/// how many chunks were needed) when they do not fit.
pub fn expand<const N: usize>(
    prefixes: &[Prefix<N>],
    capacity: Capacity,
) -> Result<PrefixTable, String> {
    let mut sorted: Vec<&Prefix<N>> = prefixes.iter().collect();
    // Shortest first: painting in this order lets a longer prefix overwrite what it
    // refines, which is exactly longest-prefix match.
    sorted.sort_by_key(|(len, addr, _)| (*len, *addr));
    let mut builder = Builder {
        chunks: Vec::new(),
        skips: Vec::new(),
        capacity,
        asks_trie: false,
    };
    let mut first = vec![0u32; 1 << 16];
    let mut default = 0;
    let mut below: std::collections::BTreeMap<usize, Vec<&Prefix<N>>> = Default::default();
    for &p in &sorted {
        let (len, addr, verdict) = *p;
        let top = usize::from(u16::from_be_bytes([addr[0], addr[1]]));
        match len {
            0 => default = verdict,
            1..=16 => first[top..top + (1 << (16 - len))].fill(verdict),
            _ => below.entry(top).or_default().push(p),
        }
    }
    for (top, group) in below {
        first[top] = builder.entry(2, &group, first[top]);
    }
    if capacity.when_full == WhenFull::Refuse && builder.chunks.len() > capacity.chunks as usize {
        return Err(format!(
            "the {} prefixes need {} tables of 256 addresses (one per /16 holding a longer prefix, one per /24 holding a prefix longer than /24, and so on), more than the {} one ruleset holds",
            if N == 4 { "IPv4" } else { "IPv6" },
            builder.chunks.len(),
            capacity.chunks
        ));
    }
    let mut first: Vec<(u32, u32)> = first
        .iter()
        .enumerate()
        .filter(|(_, v)| **v != 0)
        .map(|(i, v)| (i as u32, *v))
        .collect();
    if default != 0 {
        first.push((prefix_table::DEFAULT_INDEX, default));
    }
    Ok(PrefixTable {
        first,
        chunks: builder.chunks,
        skips: builder.skips,
        asks_trie: builder.asks_trie,
    })
}

struct Builder {
    chunks: Vec<[u32; CHUNK_ENTRIES]>,
    skips: Vec<PrefixSkip>,
    capacity: Capacity,
    asks_trie: bool,
}

impl Builder {
    /// The entry for the addresses that share bytes `0..at` with `prefixes` (all
    /// longer than `8 * at` bits, shortest first), where the shorter prefixes say
    /// `inherited`: `inherited` itself if the prefixes change nothing, else a skip
    /// or a chunk indexed by byte `at`.
    fn entry<const N: usize>(&mut self, at: usize, prefixes: &[&Prefix<N>], inherited: u32) -> u32 {
        let mut entries = [inherited; CHUNK_ENTRIES];
        let mut below: std::collections::BTreeMap<usize, Vec<&Prefix<N>>> = Default::default();
        let end = 8 * (at + 1);
        for &p in prefixes {
            let (len, addr, verdict) = *p;
            let byte = usize::from(addr[at]);
            if len as usize <= end {
                entries[byte..byte + (1 << (end - len as usize))].fill(verdict);
            } else {
                below.entry(byte).or_default().push(p);
            }
        }
        for (byte, group) in below {
            entries[byte] = self.entry(at + 1, &group, entries[byte]);
        }
        let mut differing = (0..CHUNK_ENTRIES).filter(|&b| entries[b] != inherited);
        let Some(only) = differing.next() else {
            // Prefixes that repeat what a shorter one says: nothing to look up.
            return inherited;
        };
        if differing.next().is_none()
            && self.capacity.skips > 0
            && let Some(skip) = self.skip(at, only as u8, entries[only], inherited)
        {
            return skip;
        }
        if self.full(self.chunks.len(), self.capacity.chunks) {
            return prefix_table::ASK_TRIE;
        }
        self.chunks.push(entries);
        (self.chunks.len() - 1) as u32 | prefix_table::CHUNK
    }

    /// A skip for "byte `at` is `byte`, then `next`; else `otherwise`", merged
    /// with `next` when that is a skip with the same `otherwise`. `None` when `next`
    /// is a skip that cannot be merged: the program follows one skip per entry, so
    /// that entry needs a chunk.
    fn skip(&mut self, at: usize, byte: u8, next: u32, otherwise: u32) -> Option<u32> {
        let word = at / 4;
        // The program compares the words as it reads them from the packet: byte
        // `4w + k` of the address is byte `k` of word `w` in memory.
        let mut mask_bytes = [0u8; 4];
        mask_bytes[at % 4] = 0xff;
        let mut value_bytes = [0u8; 4];
        value_bytes[at % 4] = byte;
        let (mask, value) = (
            u32::from_ne_bytes(mask_bytes),
            u32::from_ne_bytes(value_bytes),
        );
        if next & prefix_table::SKIP != 0 {
            let merged = &mut self.skips[(next & !prefix_table::SKIP) as usize];
            if merged.otherwise != otherwise {
                return None;
            }
            merged.mask[word] |= mask;
            merged.value[word] |= value;
            return Some(next);
        }
        if self.full(self.skips.len(), self.capacity.skips) {
            return Some(prefix_table::ASK_TRIE);
        }
        let mut skip = PrefixSkip {
            otherwise,
            next,
            resume: at as u32 + 1,
            ..PrefixSkip::default()
        };
        skip.mask[word] = mask;
        skip.value[word] = value;
        self.skips.push(skip);
        Some((self.skips.len() - 1) as u32 | prefix_table::SKIP)
    }

    /// Whether one more of something `used` of which exist would exceed `max`;
    /// then, with `AskTrie`, the entry asks the trie. `Refuse` counts on, so its
    /// error can say how many were needed.
    fn full(&mut self, used: usize, max: u32) -> bool {
        match self.capacity.when_full {
            WhenFull::Refuse => false,
            WhenFull::AskTrie if used >= max as usize => {
                self.asks_trie = true;
                true
            }
            WhenFull::AskTrie => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use supervisor_common::xdp::{MAX_V4_CHUNKS, VERDICT_ALLOW, VERDICT_DENY, VERDICT_NOT_ALLOWED};

    const V4: Capacity = V4_CAPACITY;
    const V6: Capacity = V6_CAPACITY;

    /// What the eBPF program does with the table (`prefix_v4`, `prefix_v6`), with
    /// `longest_match` standing in for the trie.
    fn lookup<const N: usize>(table: &PrefixTable, prefixes: &[Prefix<N>], addr: [u8; N]) -> u32 {
        let first = |i: u32| {
            table
                .first
                .iter()
                .find(|(at, _)| *at == i)
                .map_or(0, |(_, v)| *v)
        };
        let words: Vec<u32> = addr
            .chunks(4)
            .map(|w| u32::from_ne_bytes(w.try_into().unwrap()))
            .collect();
        let skip = |entry: u32| -> (u32, usize) {
            let skip = &table.skips[(entry & !prefix_table::SKIP) as usize];
            if (0..N / 4).any(|w| words[w] & skip.mask[w] != skip.value[w]) {
                (skip.otherwise, N)
            } else {
                (skip.next, skip.resume as usize)
            }
        };
        let mut entry = first(u32::from(u16::from_be_bytes([addr[0], addr[1]])));
        let mut resume = 2;
        if entry & prefix_table::SKIP != 0 {
            (entry, resume) = skip(entry);
        }
        for (at, byte) in addr.iter().enumerate().skip(2) {
            if entry & prefix_table::CHUNK == 0 {
                break;
            }
            if at < resume {
                continue;
            }
            entry = table.chunks[(entry & !prefix_table::CHUNK) as usize][usize::from(*byte)];
            resume = at + 1;
            if entry & prefix_table::SKIP != 0 {
                (entry, resume) = skip(entry);
            }
        }
        assert_eq!(
            entry & prefix_table::CHUNK,
            0,
            "a walk never ends on a chunk"
        );
        assert_eq!(
            entry & prefix_table::SKIP,
            0,
            "a skip never leads to a skip"
        );
        match entry {
            prefix_table::ASK_TRIE => longest_match(prefixes, addr),
            0 => first(prefix_table::DEFAULT_INDEX),
            verdict => verdict,
        }
    }

    /// The trie's answer: the verdict of the longest matching prefix, or 0.
    fn longest_match<const N: usize>(prefixes: &[Prefix<N>], addr: [u8; N]) -> u32 {
        let covers = |len: u32, p: &[u8; N]| {
            (0..len as usize).all(|bit| {
                let mask = 0x80 >> (bit % 8);
                addr[bit / 8] & mask == p[bit / 8] & mask
            })
        };
        prefixes
            .iter()
            .filter(|(len, p, _)| covers(*len, p))
            .max_by_key(|(len, _, _)| *len)
            .map_or(0, |(_, _, v)| *v)
    }

    /// A small deterministic generator (xorshift), so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn masked<const N: usize>(mut addr: [u8; N], len: u32) -> [u8; N] {
        for bit in len as usize..N * 8 {
            addr[bit / 8] &= !(0x80 >> (bit % 8));
        }
        addr
    }

    /// Random prefixes clustered under a few roots (so they nest and overlap like
    /// real lists), each length from `lengths`, with random verdicts and a /0.
    fn random_prefixes<const N: usize>(
        rng: &mut Rng,
        count: usize,
        lengths: &[u32],
    ) -> Vec<(u32, [u8; N], u32)> {
        let roots: Vec<[u8; N]> = (0..4)
            .map(|_| std::array::from_fn(|_| rng.next() as u8))
            .collect();
        let mut seen = std::collections::HashSet::new();
        let mut prefixes = vec![(0, [0; N], VERDICT_NOT_ALLOWED)];
        while prefixes.len() < count {
            let mut addr = roots[rng.below(roots.len() as u64) as usize];
            // Keep the root's first bytes, vary a few of the rest.
            for _ in 0..3 {
                let at = 2 + rng.below(N as u64 - 2) as usize;
                addr[at] = rng.next() as u8 & 0x0f;
            }
            let len = lengths[rng.below(lengths.len() as u64) as usize];
            let addr = masked(addr, len);
            if seen.insert((len, addr)) {
                let verdict = [VERDICT_ALLOW, VERDICT_DENY][rng.below(2) as usize];
                prefixes.push((len, addr, verdict));
            }
        }
        prefixes
    }

    /// Probes: every prefix's first and last address and its neighbours just
    /// outside, plus random addresses near the prefixes.
    fn probes<const N: usize>(rng: &mut Rng, prefixes: &[(u32, [u8; N], u32)]) -> Vec<[u8; N]> {
        let mut out = Vec::new();
        for (len, addr, _) in prefixes {
            let mut last = *addr;
            for bit in *len as usize..N * 8 {
                last[bit / 8] |= 0x80 >> (bit % 8);
            }
            let as_int = |a: &[u8; N]| a.iter().fold(0u128, |n, b| (n << 8) | u128::from(*b));
            let from_int =
                |n: u128| -> [u8; N] { std::array::from_fn(|i| (n >> (8 * (N - 1 - i))) as u8) };
            let (lo, hi) = (as_int(addr), as_int(&last));
            out.extend([*addr, last]);
            out.push(from_int(lo.wrapping_sub(1)));
            out.push(from_int(hi.wrapping_add(1)));
            let mut near = *addr;
            near[N - 1 - rng.below(N as u64 - 2) as usize] ^= rng.next() as u8;
            out.push(near);
        }
        out
    }

    fn check_against_trie<const N: usize>(
        prefixes: &[(u32, [u8; N], u32)],
        table: &PrefixTable,
        rng: &mut Rng,
    ) {
        for probe in probes(rng, prefixes) {
            assert_eq!(
                lookup(table, prefixes, probe),
                longest_match(prefixes, probe),
                "{probe:?}"
            );
        }
    }

    #[test]
    fn answers_like_a_longest_prefix_match() {
        let prefixes = vec![
            (0, [0, 0, 0, 0], VERDICT_NOT_ALLOWED),
            (8, [10, 0, 0, 0], VERDICT_ALLOW),
            (12, [10, 16, 0, 0], VERDICT_DENY),
            (20, [10, 1, 16, 0], VERDICT_DENY),
            (24, [10, 1, 17, 0], VERDICT_ALLOW),
            (28, [10, 1, 17, 16], VERDICT_DENY),
            (32, [10, 1, 17, 7], VERDICT_DENY),
            (32, [192, 0, 2, 1], VERDICT_ALLOW),
            (17, [198, 51, 128, 0], VERDICT_DENY),
        ];
        let table = expand(&prefixes, V4).unwrap();
        let probes: Vec<[u8; 4]> = vec![
            [10, 0, 0, 1],
            [10, 16, 3, 4],
            [10, 31, 255, 255],
            [10, 32, 0, 0],
            [10, 1, 16, 9],
            [10, 1, 31, 9],
            [10, 1, 17, 9],
            [10, 1, 17, 7],
            [10, 1, 17, 16],
            [10, 1, 17, 31],
            [10, 1, 17, 32],
            [192, 0, 2, 1],
            [192, 0, 2, 2],
            [198, 51, 128, 1],
            [198, 51, 127, 1],
            [203, 0, 113, 9],
        ];
        for probe in probes {
            assert_eq!(
                lookup(&table, &prefixes, probe),
                longest_match(&prefixes, probe),
                "{probe:?}"
            );
        }
        // Chunks only where a prefix is longer than /16: 10.1/16 (with 10.1.17/24
        // below it), 192.0/16 (with 192.0.2/24 below it), 198.51/16.
        assert_eq!(table.chunks.len(), 5);
        assert!(!table.asks_trie);
    }

    #[test]
    fn random_ipv4_rulesets_answer_like_a_trie() {
        let mut rng = Rng(0x5eed_0004);
        for _ in 0..20 {
            let prefixes =
                random_prefixes::<4>(&mut rng, 300, &[1, 8, 12, 16, 17, 20, 24, 25, 30, 32]);
            let table = expand(&prefixes, V4).unwrap();
            check_against_trie(&prefixes, &table, &mut rng);
        }
    }

    #[test]
    fn random_ipv6_rulesets_answer_like_a_trie() {
        let mut rng = Rng(0x5eed_0006);
        let lengths = [3, 16, 20, 32, 33, 48, 56, 64, 65, 100, 127, 128];
        for _ in 0..20 {
            let prefixes = random_prefixes::<16>(&mut rng, 300, &lengths);
            let table = expand(&prefixes, V6).unwrap();
            assert!(!table.asks_trie, "the table holds 300 prefixes");
            assert!(!table.skips.is_empty());
            check_against_trie(&prefixes, &table, &mut rng);
        }
    }

    /// Every length, and prefixes that share long runs and part from each other at
    /// word boundaries (bytes 3/4, 7/8, 11/12) and mid-byte, nested under /0, /1
    /// and /15 allow and deny verdicts: skips merged across words, skips whose
    /// `otherwise` is a shorter prefix's verdict, skips straight from the first
    /// level followed by chunks.
    #[test]
    fn every_length_and_word_boundary_answers_like_a_trie() {
        let mut rng = Rng(0x5eed_0bad);
        for round in 0..40 {
            let root: [u8; 16] = std::array::from_fn(|_| rng.next() as u8);
            let mut prefixes = vec![(0, [0; 16], VERDICT_NOT_ALLOWED)];
            let mut seen = std::collections::HashSet::new();
            while prefixes.len() < 60 {
                let mut addr = root;
                // Depart from the root at one byte near a word boundary.
                let at = [2, 3, 4, 7, 8, 11, 12, 15][rng.below(8) as usize];
                addr[at] ^= 1 << rng.below(8);
                for byte in addr.iter_mut().skip(at + 1) {
                    if rng.below(4) == 0 {
                        *byte = rng.next() as u8;
                    }
                }
                let len = if round % 2 == 0 {
                    1 + rng.below(128) as u32
                } else {
                    [1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 96, 97, 127, 128]
                        [rng.below(14) as usize]
                };
                let addr = masked(addr, len);
                if seen.insert((len, addr)) {
                    let verdict = [VERDICT_ALLOW, VERDICT_DENY][rng.below(2) as usize];
                    prefixes.push((len, addr, verdict));
                }
            }
            let table = expand(&prefixes, V6).unwrap();
            check_against_trie(&prefixes, &table, &mut rng);
            for capacity in [(1, 1), (2, 5), (8, 2)] {
                let small = Capacity {
                    chunks: capacity.0,
                    skips: capacity.1,
                    when_full: WhenFull::AskTrie,
                };
                check_against_trie(&prefixes, &expand(&prefixes, small).unwrap(), &mut rng);
            }
        }
    }

    /// With too few chunks or skips, the entries the table could not refine ask
    /// the trie, and every answer is still the longest match.
    #[test]
    fn a_full_ipv6_table_hands_the_rest_to_the_trie() {
        let mut rng = Rng(0x5eed_0066);
        let lengths = [16, 32, 48, 64, 128];
        for (chunks, skips) in [(0, 0), (1, 0), (0, 1), (5, 3), (40, 1), (3, 200), (40, 40)] {
            let prefixes = random_prefixes::<16>(&mut rng, 300, &lengths);
            let capacity = Capacity {
                chunks,
                skips,
                when_full: WhenFull::AskTrie,
            };
            let table = expand(&prefixes, capacity).unwrap();
            assert!(table.chunks.len() <= chunks as usize);
            assert!(table.skips.len() <= skips as usize);
            assert!(table.asks_trie, "{capacity:?}");
            check_against_trie(&prefixes, &table, &mut rng);
        }
    }

    /// Without the limits, the same kind of rulesets take no trie: the capacity
    /// above was what sent them there.
    #[test]
    fn skips_keep_scattered_long_prefixes_out_of_the_trie() {
        let mut rng = Rng(0x5eed_0128);
        // 4 000 /128s anywhere in 2000::/3, as a list of single hosts would be:
        // a chunk only under a first 16 bits that two of them share.
        let prefixes: Vec<Prefix<16>> = (0..4_000)
            .map(|_| {
                let mut a: [u8; 16] = std::array::from_fn(|_| rng.next() as u8);
                a[0] = 0x20 | (a[0] & 0x1f);
                (128, a, VERDICT_DENY)
            })
            .collect();
        let table = expand(&prefixes, V6).unwrap();
        assert!(!table.asks_trie);
        assert!(table.chunks.len() < 1000, "{}", table.chunks.len());
        check_against_trie(
            &prefixes[..500],
            &expand(&prefixes[..500], V6).unwrap(),
            &mut rng,
        );
    }

    /// The benchmark's realistic IPv6 list, 2 000 /48s under 2001:db8::/32 and one
    /// /128, takes a handful of chunks and two skips, and no trie.
    #[test]
    fn thousands_of_48s_under_one_32_need_few_chunks() {
        let mut prefixes: Vec<(u32, [u8; 16], u32)> = (0..2000u16)
            .map(|i| {
                let mut a = [0u8; 16];
                a[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
                a[4..6].copy_from_slice(&i.to_be_bytes());
                (48, a, VERDICT_DENY)
            })
            .collect();
        let host: std::net::Ipv6Addr = "fd00:200::2".parse().unwrap();
        prefixes.push((128, host.octets(), VERDICT_DENY));
        let table = expand(&prefixes, V6).unwrap();
        // 2001/16 → one skip for 0d b8 → a chunk for the third group's first byte
        // → 8 chunks for its second; the /128 alone under fd00/16: one skip.
        assert_eq!((table.chunks.len(), table.skips.len()), (1 + 8, 2));
        assert!(!table.asks_trie);
        let mut rng = Rng(1);
        check_against_trie(&prefixes, &table, &mut rng);
    }

    #[test]
    fn no_prefixes_no_entries() {
        assert_eq!(expand::<4>(&[], V4).unwrap(), PrefixTable::default());
    }

    #[test]
    fn too_many_ipv4_chunks_is_refused() {
        // Every /32 in its own /16: two chunks each.
        let prefixes: Vec<_> = (0..=MAX_V4_CHUNKS / 2)
            .map(|i| (32, [(i >> 8) as u8 + 1, i as u8, 0, 1], VERDICT_DENY))
            .collect();
        let err = expand(&prefixes, V4).unwrap_err();
        assert!(
            err.contains("IPv4") && err.contains("more than the 4096"),
            "{err}"
        );
    }
}
