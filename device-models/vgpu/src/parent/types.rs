//! vGPU types (as mdev types): the slice of the parent's hardware an instance
//! gets, and what is left of it.

use serde::Serialize;

/// One kind of instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct VgpuType {
    pub name: &'static str,
    pub vram_mib: u32,
    pub contexts: usize,
    pub ggtt_entries: u32,
    pub description: &'static str,
}

/// The types a parent offers.
pub const TYPES: &[VgpuType] = &[
    VgpuType {
        name: "vgpu-16m",
        vram_mib: 16,
        contexts: 1,
        ggtt_entries: 32768,
        description: "16 MiB VRAM, 1 context, 128 MiB display aperture",
    },
    VgpuType {
        name: "vgpu-64m",
        vram_mib: 64,
        contexts: 4,
        ggtt_entries: 131072,
        description: "64 MiB VRAM, 4 contexts, 512 MiB display aperture",
    },
];

pub fn find(name: &str) -> Option<&'static VgpuType> {
    TYPES.iter().find(|t| t.name == name)
}

/// Hardware a parent shares out: totals, or what instances take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Capacity {
    pub vram_mib: u64,
    pub contexts: u64,
    pub ggtt_entries: u64,
}

impl Capacity {
    pub fn of(t: &VgpuType) -> Capacity {
        Capacity {
            vram_mib: u64::from(t.vram_mib),
            contexts: t.contexts as u64,
            ggtt_entries: u64::from(t.ggtt_entries),
        }
    }

    pub fn plus(self, o: Capacity) -> Capacity {
        Capacity {
            vram_mib: self.vram_mib + o.vram_mib,
            contexts: self.contexts + o.contexts,
            ggtt_entries: self.ggtt_entries + o.ggtt_entries,
        }
    }

    /// How many more of `t` fit in `self` once `used` is taken.
    pub fn available(self, used: Capacity, t: &VgpuType) -> u64 {
        let need = Capacity::of(t);
        let left = |total: u64, used: u64, need: u64| total.saturating_sub(used) / need.max(1);
        left(self.vram_mib, used.vram_mib, need.vram_mib)
            .min(left(self.contexts, used.contexts, need.contexts))
            .min(left(
                self.ggtt_entries,
                used.ggtt_entries,
                need.ggtt_entries,
            ))
    }

    /// What of `t` does not fit, as a sentence, or `None`.
    pub fn shortfall(self, used: Capacity, t: &VgpuType) -> Option<String> {
        let need = Capacity::of(t);
        let check = |what: &str, total: u64, used: u64, need: u64| {
            (used + need > total).then(|| {
                format!(
                    "{what}: {need} needed, {} of {total} left",
                    total - used.min(total)
                )
            })
        };
        let short: Vec<String> = [
            check("VRAM MiB", self.vram_mib, used.vram_mib, need.vram_mib),
            check("contexts", self.contexts, used.contexts, need.contexts),
            check(
                "GGTT entries",
                self.ggtt_entries,
                used.ggtt_entries,
                need.ggtt_entries,
            ),
        ]
        .into_iter()
        .flatten()
        .collect();
        (!short.is_empty()).then(|| short.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn availability_shrinks_and_never_overcommits() {
        let total = Capacity {
            vram_mib: 96,
            contexts: 6,
            ggtt_entries: 262144,
        };
        let (small, big) = (find("vgpu-16m").unwrap(), find("vgpu-64m").unwrap());
        let none = Capacity::default();
        assert_eq!(total.available(none, small), 6);
        assert_eq!(total.available(none, big), 1);
        let used = Capacity::of(big);
        assert_eq!(total.available(used, small), 2);
        assert_eq!(total.available(used, big), 0);
        let msg = total.shortfall(used, big).unwrap();
        assert!(msg.contains("VRAM MiB: 64 needed, 32 of 96 left"), "{msg}");
        assert!(total.shortfall(used, small).is_none());
    }
}
