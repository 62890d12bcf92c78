/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR MIT */
/*
 * umdev_vgpu_drm.h: the userspace API of umdev_vgpu.ko (DRM driver for
 * umdev's mediated GPU, PCI 1234:5547; device-models/vgpu/SPEC.md).
 *
 * Every open file of the DRM device owns one of the device's hardware
 * contexts (4; the open fails with EBUSY when all are taken) with its own GPU
 * virtual address space: 4-level page tables the kernel keeps in guest RAM.
 * Buffers are the DRM's dumb buffers (DRM_IOCTL_MODE_CREATE_DUMB, mmap through
 * DRM_IOCTL_MODE_MAP_DUMB); a file binds them into its address space, writes
 * vGPU commands (SPEC.md "Command stream") into a bound buffer ending with
 * BATCH_END and submits that buffer: the kernel puts BATCH_START and a FENCE
 * in the context's ring and returns the fence's sequence number. A fault stops
 * only that file's submissions in flight: their fences complete with -EIO and
 * the fault (SPEC.md reason and address) is reported to WAIT.
 */
#ifndef UMDEV_VGPU_DRM_H
#define UMDEV_VGPU_DRM_H

#include <drm/drm.h>

#if defined(__cplusplus)
extern "C" {
#endif

/* GPU virtual addresses a file may use: [0, UMDEV_VGPU_VA_LIMIT), 4 KiB
 * aligned. The page at UMDEV_VGPU_VA_LIMIT holds the kernel's fence values. */
#define UMDEV_VGPU_VA_LIMIT		(1ULL << 47)

/* vm_bind flags */
#define UMDEV_VGPU_BIND_WRITABLE	(1 << 0)

/* Binds the whole buffer `handle` at GPU virtual address `va` (4 KiB aligned;
 * the range must not overlap another binding). EINVAL for a bad address or
 * flags, ENOENT for a bad handle, EEXIST for an overlap. */
struct drm_umdev_vgpu_vm_bind {
	__u32 handle;
	__u32 flags;
	__u64 va;
};

/* Removes the binding that starts at `va` (ENOENT if none), after the
 * context's submitted work is done. */
struct drm_umdev_vgpu_vm_unbind {
	__u64 va;
};

/* Runs the batch buffer at GPU virtual address `batch_va` (a bound buffer
 * holding commands, the last one BATCH_END). Out: the fence's sequence
 * number. EBUSY when the ring is full (wait for an earlier fence). */
struct drm_umdev_vgpu_submit {
	__u64 batch_va;
	__u32 seqno;
	__u32 pad;
};

/* Waits for the fence `seqno` of this file (at most timeout_ns; 0 polls).
 * Returns 0 when its work completed, EIO when a fault stopped it (out:
 * fault_reason, SPEC.md "Faults"; fault_addr), ETIME on time out, ENOENT for
 * a sequence number never submitted. */
struct drm_umdev_vgpu_wait {
	__u32 seqno;
	__u32 fault_reason;
	__s64 timeout_ns;
	__u64 fault_addr;
};

/* About this file's context. */
struct drm_umdev_vgpu_info {
	__u32 context;		/* hardware context (0-3) */
	__u32 faults;		/* faults seen on it */
	__u32 bindings;		/* buffers bound */
	__u32 tables;		/* page-table pages the kernel allocated */
	__u32 submitted;	/* last sequence number handed out */
	__u32 completed;	/* last sequence number the device wrote */
};

/* Test hook for hostile-guest tests, only with the module parameter
 * hostile_test=1 (EPERM otherwise): writes `value` into the entry that
 * translates `va` at page-table `level` (4 = root .. 1 = leaf) of this
 * file's own tables (creating the tables down to that level), then
 * invalidates the whole context. The kernel's own view of the tables is not
 * changed: unbinding and closing still free exactly what was allocated. */
struct drm_umdev_vgpu_poke_pte {
	__u64 va;
	__u64 value;
	__u32 level;
	__u32 pad;
};

#define DRM_UMDEV_VGPU_VM_BIND		0x00
#define DRM_UMDEV_VGPU_VM_UNBIND	0x01
#define DRM_UMDEV_VGPU_SUBMIT		0x02
#define DRM_UMDEV_VGPU_WAIT		0x03
#define DRM_UMDEV_VGPU_INFO		0x04
#define DRM_UMDEV_VGPU_POKE_PTE		0x05

#define DRM_IOCTL_UMDEV_VGPU_VM_BIND \
	DRM_IOW(DRM_COMMAND_BASE + DRM_UMDEV_VGPU_VM_BIND, struct drm_umdev_vgpu_vm_bind)
#define DRM_IOCTL_UMDEV_VGPU_VM_UNBIND \
	DRM_IOW(DRM_COMMAND_BASE + DRM_UMDEV_VGPU_VM_UNBIND, struct drm_umdev_vgpu_vm_unbind)
#define DRM_IOCTL_UMDEV_VGPU_SUBMIT \
	DRM_IOWR(DRM_COMMAND_BASE + DRM_UMDEV_VGPU_SUBMIT, struct drm_umdev_vgpu_submit)
#define DRM_IOCTL_UMDEV_VGPU_WAIT \
	DRM_IOWR(DRM_COMMAND_BASE + DRM_UMDEV_VGPU_WAIT, struct drm_umdev_vgpu_wait)
#define DRM_IOCTL_UMDEV_VGPU_INFO \
	DRM_IOR(DRM_COMMAND_BASE + DRM_UMDEV_VGPU_INFO, struct drm_umdev_vgpu_info)
#define DRM_IOCTL_UMDEV_VGPU_POKE_PTE \
	DRM_IOW(DRM_COMMAND_BASE + DRM_UMDEV_VGPU_POKE_PTE, struct drm_umdev_vgpu_poke_pte)

#if defined(__cplusplus)
}
#endif

#endif /* UMDEV_VGPU_DRM_H */
