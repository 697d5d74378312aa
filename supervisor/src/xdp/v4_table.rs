//! IPv4 source prefixes expanded into the filter's 16-8-8 multibit table
//! (`supervisor_common::xdp::v4_table`): what one longest-prefix-match lookup in the
//! old trie answered, as at most three array reads the verifier inlines.

use supervisor_common::xdp::{MAX_V4_CHUNKS, v4_table};

const CHUNK_ENTRIES: usize = v4_table::CHUNK_ENTRIES as usize;

/// The expanded table, ready to be written into fresh maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct V4Table {
    /// The non-zero first-level entries (index, value), the /0 verdict at
    /// `v4_table::DEFAULT_INDEX` among them when there is one.
    pub first: Vec<(u32, u32)>,
    /// Second- and third-level chunks; chunk `n` is entries `n * 256 ..` of
    /// `PREFIXES_V4_CHUNKS`.
    pub chunks: Vec<[u32; CHUNK_ENTRIES]>,
}

/// Expands (prefix length, address, verdict) entries, whose overlaps already say
/// what the longest match should answer. Fails, saying how many chunks were needed,
/// when they do not fit in `MAX_V4_CHUNKS`.
pub fn expand(prefixes: &[(u32, [u8; 4], u32)]) -> Result<V4Table, String> {
    let mut sorted: Vec<&(u32, [u8; 4], u32)> = prefixes.iter().collect();
    // Shortest first: a longer prefix then overwrites what it refines, which is
    // exactly longest-prefix match.
    sorted.sort_by_key(|(len, addr, _)| (*len, *addr));
    let mut table = Builder {
        first: vec![0; 1 << 16],
        chunks: Vec::new(),
    };
    let mut default = 0;
    for &&(len, addr, verdict) in &sorted {
        let a = u32::from_be_bytes(addr);
        let top = (a >> 16) as usize;
        let mid = ((a >> 8) & 0xff) as usize;
        let low = (a & 0xff) as usize;
        match len {
            0 => default = verdict,
            1..=16 => {
                let count = 1usize << (16 - len);
                for i in top..top + count {
                    table.first[i] = table.paint(table.first[i], verdict);
                }
            }
            17..=24 => {
                let chunk = table.chunk_of_first(top);
                let count = 1usize << (24 - len);
                for i in mid..mid + count {
                    let old = table.chunks[chunk][i];
                    table.chunks[chunk][i] = table.paint(old, verdict);
                }
            }
            _ => {
                let second = table.chunk_of_first(top);
                let third = table.chunk_of_chunk(second, mid);
                let count = 1usize << (32 - len.min(32));
                for i in low..low + count {
                    table.chunks[third][i] = verdict;
                }
            }
        }
    }
    if table.chunks.len() > MAX_V4_CHUNKS as usize {
        return Err(format!(
            "the IPv4 prefixes need {} tables of 256 addresses (one per /16 holding a prefix longer than /16, one per /24 holding a prefix longer than /24), more than the {MAX_V4_CHUNKS} one ruleset holds",
            table.chunks.len()
        ));
    }
    let mut first: Vec<(u32, u32)> = table
        .first
        .iter()
        .enumerate()
        .filter(|(_, v)| **v != 0)
        .map(|(i, v)| (i as u32, *v))
        .collect();
    if default != 0 {
        first.push((v4_table::DEFAULT_INDEX, default));
    }
    Ok(V4Table {
        first,
        chunks: table.chunks,
    })
}

struct Builder {
    first: Vec<u32>,
    chunks: Vec<[u32; CHUNK_ENTRIES]>,
}

impl Builder {
    /// `verdict` over an entry: a chunk entry gets it painted over all its entries
    /// (they are all covered by the shorter prefix being painted), anything else is
    /// replaced. With shortest-first order chunks are never painted over, but the
    /// expansion stays right without relying on it.
    fn paint(&mut self, entry: u32, verdict: u32) -> u32 {
        if entry & v4_table::CHUNK == 0 {
            return verdict;
        }
        let chunk = (entry & !v4_table::CHUNK) as usize;
        for i in 0..CHUNK_ENTRIES {
            let old = self.chunks[chunk][i];
            self.chunks[chunk][i] = self.paint(old, verdict);
        }
        entry
    }

    fn new_chunk(&mut self, fill: u32) -> u32 {
        self.chunks.push([fill; CHUNK_ENTRIES]);
        (self.chunks.len() - 1) as u32 | v4_table::CHUNK
    }

    /// The chunk the first-level entry `top` points to, made (inheriting the
    /// entry's verdict) if it held a verdict.
    fn chunk_of_first(&mut self, top: usize) -> usize {
        let entry = self.first[top];
        if entry & v4_table::CHUNK != 0 {
            return (entry & !v4_table::CHUNK) as usize;
        }
        let made = self.new_chunk(entry);
        self.first[top] = made;
        (made & !v4_table::CHUNK) as usize
    }

    fn chunk_of_chunk(&mut self, chunk: usize, mid: usize) -> usize {
        let entry = self.chunks[chunk][mid];
        if entry & v4_table::CHUNK != 0 {
            return (entry & !v4_table::CHUNK) as usize;
        }
        let made = self.new_chunk(entry);
        self.chunks[chunk][mid] = made;
        (made & !v4_table::CHUNK) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use supervisor_common::xdp::{VERDICT_ALLOW, VERDICT_DENY, VERDICT_NOT_ALLOWED};

    /// What the eBPF program does with the table (`prefix_v4`).
    fn lookup(table: &V4Table, addr: [u8; 4]) -> u32 {
        let a = u32::from_be_bytes(addr);
        let first = |i: u32| {
            table
                .first
                .iter()
                .find(|(at, _)| *at == i)
                .map_or(0, |(_, v)| *v)
        };
        let chunk = |entry: u32, bits: u32| {
            table.chunks[(entry & !v4_table::CHUNK) as usize][(bits & 0xff) as usize]
        };
        let mut entry = first(a >> 16);
        if entry & v4_table::CHUNK != 0 {
            entry = chunk(entry, a >> 8);
            if entry & v4_table::CHUNK != 0 {
                entry = chunk(entry, a);
            }
        }
        if entry == 0 {
            entry = first(v4_table::DEFAULT_INDEX);
        }
        entry
    }

    /// The trie's answer: the verdict of the longest matching prefix, or 0.
    fn longest_match(prefixes: &[(u32, [u8; 4], u32)], addr: [u8; 4]) -> u32 {
        let a = u32::from_be_bytes(addr);
        prefixes
            .iter()
            .filter(|(len, p, _)| *len == 0 || (a ^ u32::from_be_bytes(*p)) >> (32 - len) == 0)
            .max_by_key(|(len, _, _)| *len)
            .map_or(0, |(_, _, v)| *v)
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
        let table = expand(&prefixes).unwrap();
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
                lookup(&table, probe),
                longest_match(&prefixes, probe),
                "{probe:?}"
            );
        }
        // Chunks only where a prefix is longer than /16: 10.1/16 (with 10.1.17/24
        // below it), 192.0/16 (with 192.0.2/24 below it), 198.51/16.
        assert_eq!(table.chunks.len(), 5);
    }

    #[test]
    fn no_prefixes_no_entries() {
        assert_eq!(expand(&[]).unwrap(), V4Table::default());
    }

    #[test]
    fn too_many_chunks_is_refused() {
        // Every /32 in its own /16: two chunks each.
        let prefixes: Vec<_> = (0..=MAX_V4_CHUNKS / 2)
            .map(|i| (32, [(i >> 8) as u8 + 1, i as u8, 0, 1], VERDICT_DENY))
            .collect();
        let err = expand(&prefixes).unwrap_err();
        assert!(err.contains("more than the 4096"), "{err}");
    }
}
