// SPDX-License-Identifier: GPL-2.0
/*
 * umdev_vgpu: Linux PCI driver for umdev's mediated GPU (PCI 1234:5547,
 * programming model in device-models/vgpu/SPEC.md of the umdev repository).
 *
 * Binds to the device, maps BAR0 (registers, GGTT), checks the ID register and
 * reports the VRAM size, then registers a DRM/KMS device with one display:
 * framebuffers are shmem GEM objects in guest RAM; every update copies the
 * damaged rectangles into VRAM (BAR2), which the GGTT maps for scanout 0.
 *
 * The engine (uAPI in umdev_vgpu_drm.h): each DRM file that uses it gets one
 * of the four hardware contexts, with 4-level page tables this driver keeps in
 * guest RAM (the host write-tracks and shadows them), a 4 KiB ring and a fence
 * page. Buffers (GEM shmem objects) are bound at GPU virtual addresses the
 * file picks; a submission runs a batch buffer and ends with a FENCE whose
 * interrupt (MSI-X, one vector per context) signals a dma_fence. A context
 * fault fails that context's fences in flight and is cleared; the other
 * contexts never notice.
 */
#include <linux/dma-fence.h>
#include <linux/dma-mapping.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/iosys-map.h>
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/scatterlist.h>
#include <linux/sizes.h>
#include <linux/xarray.h>

#include <drm/drm_atomic_helper.h>
#include <drm/drm_connector.h>
#include <drm/drm_damage_helper.h>
#include <drm/drm_drv.h>
#include <drm/drm_edid.h>
#include <drm/drm_fbdev_shmem.h>
#include <drm/drm_format_helper.h>
#include <drm/drm_fourcc.h>
#include <drm/drm_framebuffer.h>
#include <drm/drm_gem_atomic_helper.h>
#include <drm/drm_gem_framebuffer_helper.h>
#include <drm/drm_gem_shmem_helper.h>
#include <drm/drm_ioctl.h>
#include <drm/drm_managed.h>
#include <drm/drm_modeset_helper_vtables.h>
#include <drm/drm_probe_helper.h>
#include <drm/drm_print.h>
#include <drm/drm_simple_kms_helper.h>

#include "umdev_vgpu_drm.h"

static bool hostile_test;
module_param(hostile_test, bool, 0444);
MODULE_PARM_DESC(hostile_test,
		 "allow DRM_IOCTL_UMDEV_VGPU_POKE_PTE (garbage in a file's own page tables; tests only)");

#define UMDEV_VGPU_VENDOR_ID	0x1234
#define UMDEV_VGPU_DEVICE_ID	0x5547

/* BARs (SPEC.md "BARs"). */
#define UMDEV_VGPU_MMIO_BAR	0
#define UMDEV_VGPU_VRAM_BAR	2

/* BAR0 registers (SPEC.md "Registers"; crates/umdev-vgpu-abi/src/regs.rs). */
#define UMDEV_VGPU_REG_ID	0x00
#define UMDEV_VGPU_REG_CAPS	0x04
#define UMDEV_VGPU_ID_VALUE	0x55470001
#define UMDEV_VGPU_REG_RESET		0x0c
#define UMDEV_VGPU_REG_IRQ_STATUS	0x10
#define UMDEV_VGPU_REG_IRQ_ENABLE	0x14
#define UMDEV_VGPU_REG_GLOBAL_ERROR	0x18
#define UMDEV_VGPU_IRQ_GLOBAL_ERROR	BIT(8)
/* CAPS: bits 0-7 contexts, 8-15 log2 GGTT entries, 16-31 VRAM in MiB. */
#define UMDEV_VGPU_CAPS_CONTEXTS(c)	((c) & 0xff)
#define UMDEV_VGPU_CAPS_VRAM_MIB(c)	((c) >> 16)

/* Context registers (SPEC.md "Context registers"), context n at 0x1000 + n * 0x100. */
#define UMDEV_VGPU_CONTEXTS		4
#define UMDEV_VGPU_CTX(n)		(0x1000 + (n) * 0x100)
#define UMDEV_VGPU_CTX_PT_ROOT		0x00	/* 64 bits */
#define UMDEV_VGPU_CTX_RING_BASE	0x08	/* 64 bits */
#define UMDEV_VGPU_CTX_RING_SIZE	0x10
#define UMDEV_VGPU_CTX_RING_HEAD	0x14
#define UMDEV_VGPU_CTX_RING_TAIL	0x18
#define UMDEV_VGPU_CTX_STATUS		0x1c
#define UMDEV_VGPU_CTX_STATUS_FAULTED	BIT(2)
#define UMDEV_VGPU_CTX_FAULT_REASON(s)	(((s) >> 8) & 0xff)
#define UMDEV_VGPU_CTX_FAULT_ADDR	0x20	/* 64 bits */
#define UMDEV_VGPU_CTX_TLB_INVALIDATE	0x2c
#define UMDEV_VGPU_TLB_INVALIDATE_ALL	1
#define UMDEV_VGPU_TLB_INVALIDATE_RANGE	2
#define UMDEV_VGPU_CTX_INV_START	0x30	/* 64 bits */
#define UMDEV_VGPU_CTX_INV_PAGES	0x38
#define UMDEV_VGPU_CTX_CONTROL		0x40
#define UMDEV_VGPU_CTX_CONTROL_ENABLE	BIT(0)
#define UMDEV_VGPU_CTX_CONTROL_CLEAR	BIT(1)	/* clear a fault, HEAD = TAIL */
#define UMDEV_VGPU_CTX_MSIX_VECTOR	0x44

/* Page-table entries (SPEC.md "Per-context page tables"). */
#define UMDEV_VGPU_PTE_PRESENT		BIT_ULL(0)
#define UMDEV_VGPU_PTE_WRITABLE		BIT_ULL(1)
#define UMDEV_VGPU_PT_ENTRIES		512
#define UMDEV_VGPU_PT_LEVELS		4

/* Commands (SPEC.md "Command stream"): header = opcode << 24 | flags << 16 | dwords. */
#define UMDEV_VGPU_CMD(op, flags, len)	((u32)(op) << 24 | (u32)(flags) << 16 | (len))
#define UMDEV_VGPU_OP_NOP		0x00
#define UMDEV_VGPU_OP_FENCE		0x05
#define UMDEV_VGPU_OP_BATCH_START	0x06
#define UMDEV_VGPU_FENCE_IRQ		BIT(0)

/* Each submission puts BATCH_START (3), FENCE (4) and a NOP (1) in the ring:
 * 32 bytes, so a submission never wraps around the ring's end. */
#define UMDEV_VGPU_RING_SIZE		SZ_4K
#define UMDEV_VGPU_SUBMIT_DWORDS	8
/* The fence page, in every context's address space just above user VAs. */
#define UMDEV_VGPU_FENCE_VA		UMDEV_VGPU_VA_LIMIT
/* WAIT reports the outcome of this many most recent submissions. */
#define UMDEV_VGPU_FENCES_KEPT		1024

/* Scanout 0 registers (SPEC.md "Scanout registers"). */
#define UMDEV_VGPU_SCANOUT_FB_ADDR	0x2000	/* 64 bits, a GGTT address */
#define UMDEV_VGPU_SCANOUT_FB_WIDTH	0x2008
#define UMDEV_VGPU_SCANOUT_FB_HEIGHT	0x200c
#define UMDEV_VGPU_SCANOUT_FB_STRIDE	0x2010
#define UMDEV_VGPU_SCANOUT_FB_FORMAT	0x2014
#define UMDEV_VGPU_SCANOUT_FB_ENABLE	0x2018
#define UMDEV_VGPU_FB_FORMAT_XRGB8888	1
#define UMDEV_VGPU_SCANOUT_MAX		4096

/* GGTT (SPEC.md "GGTT"): 8-byte entries from BAR0 0x100000, one per 4 KiB. */
#define UMDEV_VGPU_GGTT_BASE		0x100000
#define UMDEV_VGPU_GGTT_VALID		BIT_ULL(0)
#define UMDEV_VGPU_GGTT_VRAM		BIT_ULL(2)
#define UMDEV_VGPU_GGTT_PAGE		SZ_4K

/* The mode offered first (any up to the VRAM size and 4096x4096 is valid). */
#define UMDEV_VGPU_PREFERRED_WIDTH	1024
#define UMDEV_VGPU_PREFERRED_HEIGHT	768

struct umdev_vgpu;

/* One page-table page in guest RAM and the kernel's own view of its children
 * (what this driver allocated; the entries in guest RAM may say otherwise
 * after a POKE_PTE). */
struct umdev_vgpu_pt {
	u64 *entries;
	dma_addr_t dma;
	struct umdev_vgpu_pt *child[UMDEV_VGPU_PT_ENTRIES];
};

/* A GEM object bound into a context's address space (holds a reference). */
struct umdev_vgpu_binding {
	struct list_head link;
	struct drm_gem_object *obj;
	u64 va;
	u64 pages;
};

/* A submission's fence. `base` first: the default release frees the whole. */
struct umdev_vgpu_fence {
	struct dma_fence base;
	struct list_head link;		/* in the context's pending list */
	u32 fault_reason;
	u64 fault_addr;
};

/* A hardware context while a DRM file owns it. */
struct umdev_vgpu_ctx {
	struct umdev_vgpu *vgpu;
	unsigned int id;
	bool in_use;			/* under vgpu->ctx_lock */
	/* Tables, bindings, the ring tail; also held while a fault is cleared,
	 * so no submission slips in between the fault and its clearing. */
	struct mutex lock;
	struct umdev_vgpu_pt *root;
	unsigned int tables;
	struct list_head bindings;
	unsigned int nbindings;
	/* Bindings whose unbind timed out waiting for the engine: freed at release. */
	struct list_head stale;
	u32 *ring;
	dma_addr_t ring_dma;
	u32 tail;
	u32 *fence_page;
	dma_addr_t fence_dma;
	u64 fence_context;
	spinlock_t fence_lock;		/* pending, completed */
	struct list_head pending;
	struct xarray fences;		/* seqno -> struct umdev_vgpu_fence (a reference) */
	u32 submitted;
	u32 completed;
	u32 faults;
};

struct umdev_vgpu_file {
	struct umdev_vgpu *vgpu;
	struct umdev_vgpu_ctx *ctx;	/* taken at the first engine ioctl */
};

struct umdev_vgpu {
	struct drm_device drm;
	struct drm_simple_display_pipe pipe;
	struct drm_connector connector;
	struct pci_dev *pdev;
	void __iomem *mmio;
	/* BAR2, the whole VRAM (write-combined): the scanout buffer at offset 0. */
	void __iomem *vram;
	resource_size_t vram_size;
	/* GGTT entries written so far (0..ggtt_mapped-1 map VRAM 1:1). */
	unsigned int ggtt_mapped;
	u32 id;
	u32 caps;
	/* The engine: contexts, interrupt vectors (0 when MSI-X is missing). */
	struct umdev_vgpu_ctx ctx[UMDEV_VGPU_CONTEXTS];
	unsigned int contexts;
	unsigned int irq_vectors;
	/* Taken by the interrupt thread and whoever sets up or tears down a
	 * context: the thread never sees a context half made. Before ctx->lock. */
	struct mutex ctx_lock;
	u32 irq_enable;
};

static struct umdev_vgpu *to_umdev_vgpu(struct drm_device *drm)
{
	return container_of(drm, struct umdev_vgpu, drm);
}

/* ------------------------------------------------------------- display -- */

static const u32 umdev_vgpu_formats[] = {
	DRM_FORMAT_XRGB8888,
};

static unsigned int umdev_vgpu_stride(unsigned int width)
{
	return width * 4;
}

/* Maps VRAM [0, size) at GGTT address 0, entries not written before only. */
static void umdev_vgpu_ggtt_map_vram(struct umdev_vgpu *vgpu, resource_size_t size)
{
	unsigned int pages = DIV_ROUND_UP(size, UMDEV_VGPU_GGTT_PAGE);
	unsigned int i;

	for (i = vgpu->ggtt_mapped; i < pages; i++)
		writeq((u64)i * UMDEV_VGPU_GGTT_PAGE | UMDEV_VGPU_GGTT_VRAM |
		       UMDEV_VGPU_GGTT_VALID,
		       vgpu->mmio + UMDEV_VGPU_GGTT_BASE + 8 * (u64)i);
	if (pages > vgpu->ggtt_mapped)
		vgpu->ggtt_mapped = pages;
}

static enum drm_mode_status
umdev_vgpu_pipe_mode_valid(struct drm_simple_display_pipe *pipe,
			   const struct drm_display_mode *mode)
{
	struct umdev_vgpu *vgpu = to_umdev_vgpu(pipe->crtc.dev);

	if (mode->hdisplay > UMDEV_VGPU_SCANOUT_MAX || mode->vdisplay > UMDEV_VGPU_SCANOUT_MAX)
		return MODE_BAD;
	if ((resource_size_t)umdev_vgpu_stride(mode->hdisplay) * mode->vdisplay > vgpu->vram_size)
		return MODE_MEM;
	return MODE_OK;
}

static void umdev_vgpu_pipe_enable(struct drm_simple_display_pipe *pipe,
				   struct drm_crtc_state *crtc_state,
				   struct drm_plane_state *plane_state)
{
	struct umdev_vgpu *vgpu = to_umdev_vgpu(pipe->crtc.dev);
	const struct drm_display_mode *mode = &crtc_state->mode;
	unsigned int stride = umdev_vgpu_stride(mode->hdisplay);
	int idx;

	if (!drm_dev_enter(&vgpu->drm, &idx))
		return;
	umdev_vgpu_ggtt_map_vram(vgpu, (resource_size_t)stride * mode->vdisplay);
	writeq(0, vgpu->mmio + UMDEV_VGPU_SCANOUT_FB_ADDR);
	writel(mode->hdisplay, vgpu->mmio + UMDEV_VGPU_SCANOUT_FB_WIDTH);
	writel(mode->vdisplay, vgpu->mmio + UMDEV_VGPU_SCANOUT_FB_HEIGHT);
	writel(stride, vgpu->mmio + UMDEV_VGPU_SCANOUT_FB_STRIDE);
	writel(UMDEV_VGPU_FB_FORMAT_XRGB8888, vgpu->mmio + UMDEV_VGPU_SCANOUT_FB_FORMAT);
	writel(1, vgpu->mmio + UMDEV_VGPU_SCANOUT_FB_ENABLE);
	drm_dev_exit(idx);
	drm_dbg_kms(&vgpu->drm, "scanout %ux%u stride %u\n", mode->hdisplay,
		    mode->vdisplay, stride);
}

static void umdev_vgpu_pipe_disable(struct drm_simple_display_pipe *pipe)
{
	struct umdev_vgpu *vgpu = to_umdev_vgpu(pipe->crtc.dev);
	int idx;

	if (!drm_dev_enter(&vgpu->drm, &idx))
		return;
	writel(0, vgpu->mmio + UMDEV_VGPU_SCANOUT_FB_ENABLE);
	drm_dev_exit(idx);
}

/* Copies the damaged parts of the framebuffer into the VRAM scanout buffer. */
static void umdev_vgpu_pipe_update(struct drm_simple_display_pipe *pipe,
				   struct drm_plane_state *old_state)
{
	struct umdev_vgpu *vgpu = to_umdev_vgpu(pipe->crtc.dev);
	struct drm_plane_state *state = pipe->plane.state;
	struct drm_shadow_plane_state *shadow = to_drm_shadow_plane_state(state);
	struct drm_framebuffer *fb = state->fb;
	struct drm_atomic_helper_damage_iter iter;
	unsigned int stride;
	struct drm_rect clip;
	int idx;

	if (!fb || !state->crtc || !state->crtc->state->active)
		return;
	if (!drm_dev_enter(&vgpu->drm, &idx))
		return;
	stride = umdev_vgpu_stride(state->crtc->state->mode.hdisplay);
	drm_atomic_helper_damage_iter_init(&iter, old_state, state);
	drm_atomic_for_each_plane_damage(&iter, &clip) {
		struct iosys_map dst = IOSYS_MAP_INIT_VADDR_IOMEM(vgpu->vram);
		/* The clip is in framebuffer coordinates; the scanout starts at src. */
		struct drm_rect at = clip;

		drm_rect_translate(&at, -(state->src.x1 >> 16), -(state->src.y1 >> 16));
		iosys_map_incr(&dst, drm_fb_clip_offset(stride, fb->format, &at));
		drm_fb_memcpy(&dst, &stride, shadow->data, fb, &clip);
	}
	drm_dev_exit(idx);
}

static const struct drm_simple_display_pipe_funcs umdev_vgpu_pipe_funcs = {
	.mode_valid = umdev_vgpu_pipe_mode_valid,
	.enable = umdev_vgpu_pipe_enable,
	.disable = umdev_vgpu_pipe_disable,
	.update = umdev_vgpu_pipe_update,
	DRM_GEM_SIMPLE_DISPLAY_PIPE_SHADOW_PLANE_FUNCS,
};

static int umdev_vgpu_connector_get_modes(struct drm_connector *connector)
{
	struct umdev_vgpu *vgpu = to_umdev_vgpu(connector->dev);
	int count;

	count = drm_add_modes_noedid(connector,
				     connector->dev->mode_config.max_width,
				     connector->dev->mode_config.max_height);
	drm_set_preferred_mode(connector, UMDEV_VGPU_PREFERRED_WIDTH,
			       UMDEV_VGPU_PREFERRED_HEIGHT);
	drm_dbg_kms(&vgpu->drm, "%d modes\n", count);
	return count;
}

static const struct drm_connector_helper_funcs umdev_vgpu_connector_helper_funcs = {
	.get_modes = umdev_vgpu_connector_get_modes,
};

static const struct drm_connector_funcs umdev_vgpu_connector_funcs = {
	.fill_modes = drm_helper_probe_single_connector_modes,
	.destroy = drm_connector_cleanup,
	.reset = drm_atomic_helper_connector_reset,
	.atomic_duplicate_state = drm_atomic_helper_connector_duplicate_state,
	.atomic_destroy_state = drm_atomic_helper_connector_destroy_state,
};

static const struct drm_mode_config_funcs umdev_vgpu_mode_config_funcs = {
	.fb_create = drm_gem_fb_create_with_dirty,
	.atomic_check = drm_atomic_helper_check,
	.atomic_commit = drm_atomic_helper_commit,
};

static int umdev_vgpu_modeset_init(struct umdev_vgpu *vgpu)
{
	struct drm_device *drm = &vgpu->drm;
	int ret;

	ret = drmm_mode_config_init(drm);
	if (ret)
		return ret;
	drm->mode_config.min_width = 1;
	drm->mode_config.min_height = 1;
	drm->mode_config.max_width = UMDEV_VGPU_SCANOUT_MAX;
	drm->mode_config.max_height = UMDEV_VGPU_SCANOUT_MAX;
	drm->mode_config.preferred_depth = 24;
	drm->mode_config.funcs = &umdev_vgpu_mode_config_funcs;

	drm_connector_helper_add(&vgpu->connector, &umdev_vgpu_connector_helper_funcs);
	ret = drm_connector_init(drm, &vgpu->connector, &umdev_vgpu_connector_funcs,
				 DRM_MODE_CONNECTOR_VIRTUAL);
	if (ret)
		return ret;
	ret = drm_simple_display_pipe_init(drm, &vgpu->pipe, &umdev_vgpu_pipe_funcs,
					   umdev_vgpu_formats,
					   ARRAY_SIZE(umdev_vgpu_formats), NULL,
					   &vgpu->connector);
	if (ret)
		return ret;
	drm_plane_enable_fb_damage_clips(&vgpu->pipe.plane);
	drm_mode_config_reset(drm);
	return 0;
}

/* -------------------------------------------------------------- engine -- */

static void __iomem *umdev_vgpu_ctx_reg(struct umdev_vgpu_ctx *ctx, unsigned int reg)
{
	return ctx->vgpu->mmio + UMDEV_VGPU_CTX(ctx->id) + reg;
}

static const char *umdev_vgpu_fence_driver_name(struct dma_fence *fence)
{
	return "umdev_vgpu";
}

static const char *umdev_vgpu_fence_timeline_name(struct dma_fence *fence)
{
	return "context";
}

static const struct dma_fence_ops umdev_vgpu_fence_ops = {
	.get_driver_name = umdev_vgpu_fence_driver_name,
	.get_timeline_name = umdev_vgpu_fence_timeline_name,
};

/* Seqno a is at or before b (sequence numbers wrap). */
static bool umdev_vgpu_seqno_passed(u32 a, u32 b)
{
	return (s32)(a - b) <= 0;
}

/* Signals the pending fences the device has passed (the fence page holds the
 * last sequence number a FENCE wrote); with `error`, all the others too, as
 * failed with that fault. Called with fence_lock held. */
static void umdev_vgpu_ctx_signal_locked(struct umdev_vgpu_ctx *ctx, int error,
					 u32 reason, u64 addr)
{
	struct umdev_vgpu_fence *f, *next;
	u32 done = READ_ONCE(*ctx->fence_page);

	ctx->completed = done;
	list_for_each_entry_safe(f, next, &ctx->pending, link) {
		if (!umdev_vgpu_seqno_passed(f->base.seqno, done)) {
			if (!error)
				break;
			f->fault_reason = reason;
			f->fault_addr = addr;
			dma_fence_set_error(&f->base, error);
		}
		list_del(&f->link);
		drm_dbg(&ctx->vgpu->drm, "context %u fence %llu %s\n", ctx->id,
			f->base.seqno, f->base.error ? "failed" : "done");
		dma_fence_signal_locked(&f->base);
		dma_fence_put(&f->base);
	}
}

/* Brings the context's fences up to date with the device: completed ones are
 * signalled; a fault fails those in flight and is cleared (HEAD = TAIL), so
 * the file's next submission runs. Called with vgpu->ctx_lock held, for a
 * context in use, the device present. */
static void umdev_vgpu_ctx_service(struct umdev_vgpu_ctx *ctx)
{
	struct umdev_vgpu *vgpu = ctx->vgpu;
	u32 status = readl(umdev_vgpu_ctx_reg(ctx, UMDEV_VGPU_CTX_STATUS));
	unsigned long flags;

	if (!(status & UMDEV_VGPU_CTX_STATUS_FAULTED)) {
		spin_lock_irqsave(&ctx->fence_lock, flags);
		umdev_vgpu_ctx_signal_locked(ctx, 0, 0, 0);
		spin_unlock_irqrestore(&ctx->fence_lock, flags);
		return;
	}
	mutex_lock(&ctx->lock);
	{
		u32 reason = UMDEV_VGPU_CTX_FAULT_REASON(status);
		u64 addr = readq(umdev_vgpu_ctx_reg(ctx, UMDEV_VGPU_CTX_FAULT_ADDR));

		ctx->faults++;
		drm_err_ratelimited(&vgpu->drm,
				    "context %u fault: reason %u at 0x%llx (fences after %u fail)\n",
				    ctx->id, reason, addr, READ_ONCE(*ctx->fence_page));
		spin_lock_irqsave(&ctx->fence_lock, flags);
		umdev_vgpu_ctx_signal_locked(ctx, -EIO, reason, addr);
		spin_unlock_irqrestore(&ctx->fence_lock, flags);
		writel(UMDEV_VGPU_CTX_CONTROL_ENABLE | UMDEV_VGPU_CTX_CONTROL_CLEAR,
		       umdev_vgpu_ctx_reg(ctx, UMDEV_VGPU_CTX_CONTROL));
	}
	mutex_unlock(&ctx->lock);
}

/* The interrupt thread (every vector): each context whose bit is set in
 * IRQ_STATUS is serviced; a global error is logged. */
static irqreturn_t umdev_vgpu_irq_thread(int irq, void *arg)
{
	struct umdev_vgpu *vgpu = arg;
	irqreturn_t ret = IRQ_NONE;
	unsigned int n;
	u32 status;
	int idx;

	if (!drm_dev_enter(&vgpu->drm, &idx))
		return IRQ_NONE;
	mutex_lock(&vgpu->ctx_lock);
	status = readl(vgpu->mmio + UMDEV_VGPU_REG_IRQ_STATUS);
	if (status) {
		ret = IRQ_HANDLED;
		writel(status, vgpu->mmio + UMDEV_VGPU_REG_IRQ_STATUS);
		if (status & UMDEV_VGPU_IRQ_GLOBAL_ERROR)
			drm_err_ratelimited(&vgpu->drm, "device error %u\n",
					    readl(vgpu->mmio + UMDEV_VGPU_REG_GLOBAL_ERROR));
		for (n = 0; n < vgpu->contexts; n++)
			if ((status & BIT(n)) && vgpu->ctx[n].in_use)
				umdev_vgpu_ctx_service(&vgpu->ctx[n]);
	}
	mutex_unlock(&vgpu->ctx_lock);
	drm_dev_exit(idx);
	return ret;
}

static struct umdev_vgpu_pt *umdev_vgpu_pt_alloc(struct umdev_vgpu_ctx *ctx)
{
	struct device *dev = &ctx->vgpu->pdev->dev;
	struct umdev_vgpu_pt *pt = kzalloc(sizeof(*pt), GFP_KERNEL);

	if (!pt)
		return NULL;
	pt->entries = dma_alloc_coherent(dev, SZ_4K, &pt->dma, GFP_KERNEL);
	if (!pt->entries) {
		kfree(pt);
		return NULL;
	}
	ctx->tables++;
	return pt;
}

static void umdev_vgpu_pt_free(struct umdev_vgpu_ctx *ctx, struct umdev_vgpu_pt *pt)
{
	unsigned int i;

	if (!pt)
		return;
	for (i = 0; i < UMDEV_VGPU_PT_ENTRIES; i++)
		umdev_vgpu_pt_free(ctx, pt->child[i]);
	dma_free_coherent(&ctx->vgpu->pdev->dev, SZ_4K, pt->entries, pt->dma);
	kfree(pt);
	ctx->tables--;
}

static unsigned int umdev_vgpu_pt_index(u64 va, unsigned int level)
{
	return (va >> (12 + 9 * (level - 1))) & (UMDEV_VGPU_PT_ENTRIES - 1);
}

/* The table at `level` (1 = leaf table) on the way to `va`, made (zeroed, then
 * linked) where missing. NULL when out of memory. Called with ctx->lock. */
static struct umdev_vgpu_pt *umdev_vgpu_pt_walk(struct umdev_vgpu_ctx *ctx, u64 va,
						unsigned int level)
{
	struct umdev_vgpu_pt *pt = ctx->root;
	unsigned int l;

	for (l = UMDEV_VGPU_PT_LEVELS; l > level; l--) {
		unsigned int i = umdev_vgpu_pt_index(va, l);

		if (!pt->child[i]) {
			struct umdev_vgpu_pt *child = umdev_vgpu_pt_alloc(ctx);

			if (!child)
				return NULL;
			pt->child[i] = child;
			WRITE_ONCE(pt->entries[i], child->dma | UMDEV_VGPU_PTE_PRESENT);
		}
		pt = pt->child[i];
	}
	return pt;
}

/* Writes the leaf entry for `va` (0 unmaps). Called with ctx->lock. */
static int umdev_vgpu_pt_set(struct umdev_vgpu_ctx *ctx, u64 va, u64 entry)
{
	struct umdev_vgpu_pt *leaf = umdev_vgpu_pt_walk(ctx, va, 1);

	if (!leaf)
		return -ENOMEM;
	WRITE_ONCE(leaf->entries[umdev_vgpu_pt_index(va, 1)], entry);
	return 0;
}

/* A sync point for [va, va + pages * 4 KiB): the device re-reads the tables
 * that translate it. */
static void umdev_vgpu_ctx_invalidate(struct umdev_vgpu_ctx *ctx, u64 va, u64 pages)
{
	int idx;

	if (!drm_dev_enter(&ctx->vgpu->drm, &idx))
		return;
	/* Commands and tables in guest RAM before the register writes. */
	wmb();
	if (pages > U32_MAX) {
		writel(UMDEV_VGPU_TLB_INVALIDATE_ALL,
		       umdev_vgpu_ctx_reg(ctx, UMDEV_VGPU_CTX_TLB_INVALIDATE));
	} else {
		writeq(va, umdev_vgpu_ctx_reg(ctx, UMDEV_VGPU_CTX_INV_START));
		writel(pages, umdev_vgpu_ctx_reg(ctx, UMDEV_VGPU_CTX_INV_PAGES));
		writel(UMDEV_VGPU_TLB_INVALIDATE_RANGE,
		       umdev_vgpu_ctx_reg(ctx, UMDEV_VGPU_CTX_TLB_INVALIDATE));
	}
	drm_dev_exit(idx);
}

/* Waits until the device has passed `seqno` (interrupts signal the fences;
 * the registers are also read every 100 ms in case one is lost). 0, or
 * -ETIME, -ERESTARTSYS, -EIO (the fence failed), -ENOENT (never submitted). */
static int umdev_vgpu_ctx_wait(struct umdev_vgpu_ctx *ctx, u32 seqno, s64 timeout_ns,
			       u32 *reason, u64 *addr)
{
	struct umdev_vgpu *vgpu = ctx->vgpu;
	unsigned long left = nsecs_to_jiffies(max_t(s64, timeout_ns, 0));
	struct umdev_vgpu_fence *f;
	long r = 0;
	int idx;

	if (seqno == 0 || !umdev_vgpu_seqno_passed(seqno, READ_ONCE(ctx->submitted)))
		return -ENOENT;
	xa_lock(&ctx->fences);
	f = xa_load(&ctx->fences, seqno);
	if (f)
		dma_fence_get(&f->base);
	xa_unlock(&ctx->fences);
	if (!f)
		return 0;	/* older than the fences kept, long done */
	for (;;) {
		unsigned long slice = min_t(unsigned long, left, HZ / 10);

		if (dma_fence_is_signaled(&f->base))
			break;
		if (drm_dev_enter(&vgpu->drm, &idx)) {
			mutex_lock(&vgpu->ctx_lock);
			umdev_vgpu_ctx_service(ctx);
			mutex_unlock(&vgpu->ctx_lock);
			drm_dev_exit(idx);
		}
		if (dma_fence_is_signaled(&f->base))
			break;
		if (!left) {
			r = -ETIME;
			break;
		}
		r = dma_fence_wait_timeout(&f->base, true, max(slice, 1UL));
		if (r < 0)
			break;
		r = 0;
		left -= min(left, max(slice, 1UL));
	}
	if (!r && f->base.error) {
		r = f->base.error;
		*reason = f->fault_reason;
		*addr = f->fault_addr;
	}
	dma_fence_put(&f->base);
	return r;
}

/* Drops every pending fence as failed with `error` (the context is going). */
static void umdev_vgpu_ctx_cancel(struct umdev_vgpu_ctx *ctx, int error)
{
	struct umdev_vgpu_fence *f, *next;
	unsigned long flags;

	spin_lock_irqsave(&ctx->fence_lock, flags);
	list_for_each_entry_safe(f, next, &ctx->pending, link) {
		list_del(&f->link);
		dma_fence_set_error(&f->base, error);
		dma_fence_signal_locked(&f->base);
		dma_fence_put(&f->base);
	}
	spin_unlock_irqrestore(&ctx->fence_lock, flags);
}

/* Takes a free hardware context for `file`: tables, ring and fence page in
 * guest RAM, then the registers. Called with vgpu->ctx_lock. */
static int umdev_vgpu_ctx_acquire(struct umdev_vgpu *vgpu, struct umdev_vgpu_file *file)
{
	struct device *dev = &vgpu->pdev->dev;
	struct umdev_vgpu_ctx *ctx = NULL;
	unsigned int n;
	int ret, idx;

	if (!vgpu->irq_vectors)
		return -ENODEV;
	for (n = 0; n < vgpu->contexts && !ctx; n++)
		if (!vgpu->ctx[n].in_use)
			ctx = &vgpu->ctx[n];
	if (!ctx)
		return -EBUSY;
	ctx->tables = 0;
	ctx->nbindings = 0;
	ctx->submitted = 0;
	ctx->completed = 0;
	ctx->faults = 0;
	INIT_LIST_HEAD(&ctx->bindings);
	INIT_LIST_HEAD(&ctx->stale);
	INIT_LIST_HEAD(&ctx->pending);
	xa_init(&ctx->fences);
	ctx->fence_context = dma_fence_context_alloc(1);
	ret = -ENOMEM;
	ctx->ring = dma_alloc_coherent(dev, UMDEV_VGPU_RING_SIZE, &ctx->ring_dma, GFP_KERNEL);
	if (!ctx->ring)
		goto err;
	ctx->fence_page = dma_alloc_coherent(dev, SZ_4K, &ctx->fence_dma, GFP_KERNEL);
	if (!ctx->fence_page)
		goto err_ring;
	ctx->root = umdev_vgpu_pt_alloc(ctx);
	if (!ctx->root)
		goto err_fence;
	ret = umdev_vgpu_pt_set(ctx, UMDEV_VGPU_FENCE_VA, ctx->fence_dma |
				UMDEV_VGPU_PTE_PRESENT | UMDEV_VGPU_PTE_WRITABLE);
	if (ret)
		goto err_tables;
	ret = -ENODEV;
	if (!drm_dev_enter(&vgpu->drm, &idx))
		goto err_tables;
	wmb();
	writeq(ctx->root->dma, umdev_vgpu_ctx_reg(ctx, UMDEV_VGPU_CTX_PT_ROOT));
	writeq(ctx->ring_dma, umdev_vgpu_ctx_reg(ctx, UMDEV_VGPU_CTX_RING_BASE));
	writel(UMDEV_VGPU_RING_SIZE, umdev_vgpu_ctx_reg(ctx, UMDEV_VGPU_CTX_RING_SIZE));
	writel(ctx->id % vgpu->irq_vectors, umdev_vgpu_ctx_reg(ctx, UMDEV_VGPU_CTX_MSIX_VECTOR));
	/* Whatever the last owner left: no fault, HEAD = TAIL; we go on from there. */
	writel(UMDEV_VGPU_CTX_CONTROL_ENABLE | UMDEV_VGPU_CTX_CONTROL_CLEAR,
	       umdev_vgpu_ctx_reg(ctx, UMDEV_VGPU_CTX_CONTROL));
	ctx->tail = readl(umdev_vgpu_ctx_reg(ctx, UMDEV_VGPU_CTX_RING_HEAD)) &
		    (UMDEV_VGPU_RING_SIZE - 1) & ~3;
	/* Submissions start 32-byte aligned (none wraps): NOPs up to there. */
	if (ctx->tail % (UMDEV_VGPU_SUBMIT_DWORDS * 4)) {
		while (ctx->tail % (UMDEV_VGPU_SUBMIT_DWORDS * 4)) {
			ctx->ring[ctx->tail / 4] = UMDEV_VGPU_CMD(UMDEV_VGPU_OP_NOP, 0, 1);
			ctx->tail += 4;
		}
		ctx->tail &= UMDEV_VGPU_RING_SIZE - 1;
		wmb();
		writel(ctx->tail, umdev_vgpu_ctx_reg(ctx, UMDEV_VGPU_CTX_RING_TAIL));
	}
	vgpu->irq_enable |= BIT(ctx->id);
	writel(vgpu->irq_enable, vgpu->mmio + UMDEV_VGPU_REG_IRQ_ENABLE);
	drm_dev_exit(idx);
	ctx->in_use = true;
	file->ctx = ctx;
	drm_dbg(&vgpu->drm, "context %u: root 0x%llx ring 0x%llx\n", ctx->id,
		(u64)ctx->root->dma, (u64)ctx->ring_dma);
	return 0;

err_tables:
	umdev_vgpu_pt_free(ctx, ctx->root);
	ctx->root = NULL;
err_fence:
	dma_free_coherent(dev, SZ_4K, ctx->fence_page, ctx->fence_dma);
err_ring:
	dma_free_coherent(dev, UMDEV_VGPU_RING_SIZE, ctx->ring, ctx->ring_dma);
err:
	xa_destroy(&ctx->fences);
	return ret;
}

static void umdev_vgpu_binding_free(struct umdev_vgpu_binding *b)
{
	list_del(&b->link);
	drm_gem_object_put(b->obj);
	kfree(b);
}

/* Gives the file's context back: waits (1 s at most) for its work, stops it,
 * frees everything acquire and the file's ioctls allocated. */
static void umdev_vgpu_ctx_release(struct umdev_vgpu_ctx *ctx)
{
	struct umdev_vgpu *vgpu = ctx->vgpu;
	struct device *dev = &vgpu->pdev->dev;
	struct umdev_vgpu_binding *b, *next;
	struct umdev_vgpu_fence *f;
	unsigned long seqno;
	u32 reason;
	u64 addr;
	int idx;

	if (ctx->submitted &&
	    umdev_vgpu_ctx_wait(ctx, ctx->submitted, NSEC_PER_SEC, &reason, &addr) == -ETIME)
		drm_err(&vgpu->drm, "context %u still busy at release\n", ctx->id);
	mutex_lock(&vgpu->ctx_lock);
	mutex_lock(&ctx->lock);
	if (drm_dev_enter(&vgpu->drm, &idx)) {
		vgpu->irq_enable &= ~BIT(ctx->id);
		writel(vgpu->irq_enable, vgpu->mmio + UMDEV_VGPU_REG_IRQ_ENABLE);
		/* Disabled, nothing left to run, no tables. */
		writel(UMDEV_VGPU_CTX_CONTROL_CLEAR, umdev_vgpu_ctx_reg(ctx, UMDEV_VGPU_CTX_CONTROL));
		writeq(0, umdev_vgpu_ctx_reg(ctx, UMDEV_VGPU_CTX_PT_ROOT));
		writeq(0, umdev_vgpu_ctx_reg(ctx, UMDEV_VGPU_CTX_RING_BASE));
		writel(0, umdev_vgpu_ctx_reg(ctx, UMDEV_VGPU_CTX_RING_SIZE));
		drm_dev_exit(idx);
	}
	umdev_vgpu_ctx_cancel(ctx, -ECANCELED);
	xa_for_each(&ctx->fences, seqno, f)
		dma_fence_put(&f->base);
	xa_destroy(&ctx->fences);
	list_for_each_entry_safe(b, next, &ctx->bindings, link)
		umdev_vgpu_binding_free(b);
	list_for_each_entry_safe(b, next, &ctx->stale, link)
		umdev_vgpu_binding_free(b);
	umdev_vgpu_pt_free(ctx, ctx->root);
	ctx->root = NULL;
	dma_free_coherent(dev, SZ_4K, ctx->fence_page, ctx->fence_dma);
	dma_free_coherent(dev, UMDEV_VGPU_RING_SIZE, ctx->ring, ctx->ring_dma);
	drm_dbg(&vgpu->drm, "context %u released (%u faults, %u submissions)\n",
		ctx->id, ctx->faults, ctx->submitted);
	ctx->in_use = false;
	mutex_unlock(&ctx->lock);
	mutex_unlock(&vgpu->ctx_lock);
}

/* The file's context, taken at its first use. */
static struct umdev_vgpu_ctx *umdev_vgpu_file_ctx(struct drm_file *file)
{
	struct umdev_vgpu_file *priv = file->driver_priv;
	struct umdev_vgpu *vgpu = priv->vgpu;
	int ret = 0;

	mutex_lock(&vgpu->ctx_lock);
	if (!priv->ctx)
		ret = umdev_vgpu_ctx_acquire(vgpu, priv);
	mutex_unlock(&vgpu->ctx_lock);
	return ret ? ERR_PTR(ret) : priv->ctx;
}

static int umdev_vgpu_ioctl_vm_bind(struct drm_device *drm, void *data, struct drm_file *file)
{
	struct drm_umdev_vgpu_vm_bind *args = data;
	struct umdev_vgpu_binding *b, *other;
	struct sg_dma_page_iter iter;
	struct umdev_vgpu_ctx *ctx;
	struct drm_gem_object *obj;
	struct sg_table *sgt;
	u64 pte_flags = UMDEV_VGPU_PTE_PRESENT, i = 0;
	int ret;

	if (args->flags & ~UMDEV_VGPU_BIND_WRITABLE || !IS_ALIGNED(args->va, SZ_4K))
		return -EINVAL;
	if (args->flags & UMDEV_VGPU_BIND_WRITABLE)
		pte_flags |= UMDEV_VGPU_PTE_WRITABLE;
	obj = drm_gem_object_lookup(file, args->handle);
	if (!obj)
		return -ENOENT;
	ret = -EINVAL;
	if (args->va >= UMDEV_VGPU_VA_LIMIT || obj->size > UMDEV_VGPU_VA_LIMIT - args->va)
		goto err_put;
	ctx = umdev_vgpu_file_ctx(file);
	if (IS_ERR(ctx)) {
		ret = PTR_ERR(ctx);
		goto err_put;
	}
	ret = -ENOMEM;
	b = kzalloc(sizeof(*b), GFP_KERNEL);
	if (!b)
		goto err_put;
	b->obj = obj;
	b->va = args->va;
	b->pages = obj->size >> PAGE_SHIFT;
	mutex_lock(&ctx->lock);
	list_for_each_entry(other, &ctx->bindings, link) {
		if (b->va < other->va + (other->pages << PAGE_SHIFT) &&
		    other->va < b->va + (b->pages << PAGE_SHIFT)) {
			ret = -EEXIST;
			goto err_unlock;
		}
	}
	/* Pins the pages and maps them for the device until the object goes. */
	sgt = drm_gem_shmem_get_pages_sgt(to_drm_gem_shmem_obj(obj));
	if (IS_ERR(sgt)) {
		ret = PTR_ERR(sgt);
		goto err_unlock;
	}
	for_each_sgtable_dma_page(sgt, &iter, 0) {
		if (i == b->pages)
			break;
		ret = umdev_vgpu_pt_set(ctx, b->va + (i << PAGE_SHIFT),
					sg_page_iter_dma_address(&iter) | pte_flags);
		if (ret)
			break;
		i++;
	}
	if (ret || i != b->pages) {
		while (i--)
			umdev_vgpu_pt_set(ctx, b->va + (i << PAGE_SHIFT), 0);
		ret = ret ?: -EINVAL;
		goto err_unlock;
	}
	list_add_tail(&b->link, &ctx->bindings);
	ctx->nbindings++;
	umdev_vgpu_ctx_invalidate(ctx, b->va, b->pages);
	mutex_unlock(&ctx->lock);
	drm_dbg(drm, "context %u: bound %llu pages at 0x%llx\n", ctx->id, b->pages, b->va);
	return 0;

err_unlock:
	mutex_unlock(&ctx->lock);
	kfree(b);
err_put:
	drm_gem_object_put(obj);
	return ret;
}

static int umdev_vgpu_ioctl_vm_unbind(struct drm_device *drm, void *data, struct drm_file *file)
{
	struct drm_umdev_vgpu_vm_unbind *args = data;
	struct umdev_vgpu_binding *b = NULL, *it;
	struct umdev_vgpu_ctx *ctx;
	u32 reason, seqno;
	u64 addr, i;
	int ret;

	ctx = umdev_vgpu_file_ctx(file);
	if (IS_ERR(ctx))
		return PTR_ERR(ctx);
	mutex_lock(&ctx->lock);
	list_for_each_entry(it, &ctx->bindings, link)
		if (it->va == args->va)
			b = it;
	if (!b) {
		mutex_unlock(&ctx->lock);
		return -ENOENT;
	}
	for (i = 0; i < b->pages; i++)
		umdev_vgpu_pt_set(ctx, b->va + (i << PAGE_SHIFT), 0);
	umdev_vgpu_ctx_invalidate(ctx, b->va, b->pages);
	list_del_init(&b->link);
	ctx->nbindings--;
	seqno = ctx->submitted;
	mutex_unlock(&ctx->lock);
	/* Work submitted before the unbind may still use the pages. */
	ret = seqno ? umdev_vgpu_ctx_wait(ctx, seqno, 2 * NSEC_PER_SEC, &reason, &addr) : 0;
	mutex_lock(&ctx->lock);
	if (ret == -ETIME || ret == -ERESTARTSYS) {
		list_add_tail(&b->link, &ctx->stale);
		drm_dbg(drm, "context %u: unbind of 0x%llx deferred to release\n", ctx->id, b->va);
	} else {
		list_add(&b->link, &ctx->stale);
		umdev_vgpu_binding_free(b);
	}
	mutex_unlock(&ctx->lock);
	return 0;
}

static int umdev_vgpu_ioctl_submit(struct drm_device *drm, void *data, struct drm_file *file)
{
	struct drm_umdev_vgpu_submit *args = data;
	struct umdev_vgpu_fence *f;
	struct umdev_vgpu_ctx *ctx;
	unsigned long flags;
	u32 head, used, *cmd, seqno;
	int ret, idx;

	ctx = umdev_vgpu_file_ctx(file);
	if (IS_ERR(ctx))
		return PTR_ERR(ctx);
	f = kzalloc(sizeof(*f), GFP_KERNEL);
	if (!f)
		return -ENOMEM;
	if (!drm_dev_enter(drm, &idx)) {
		kfree(f);
		return -ENODEV;
	}
	mutex_lock(&ctx->lock);
	head = readl(umdev_vgpu_ctx_reg(ctx, UMDEV_VGPU_CTX_RING_HEAD));
	used = (ctx->tail - head) & (UMDEV_VGPU_RING_SIZE - 1);
	if (used + UMDEV_VGPU_SUBMIT_DWORDS * 4 >= UMDEV_VGPU_RING_SIZE) {
		ret = -EBUSY;
		goto err_unlock;
	}
	seqno = ++ctx->submitted;
	dma_fence_init(&f->base, &umdev_vgpu_fence_ops, &ctx->fence_lock,
		       ctx->fence_context, seqno);
	/* One reference for the pending list, one for WAIT's table. */
	dma_fence_get(&f->base);
	ret = xa_err(xa_store(&ctx->fences, seqno, f, GFP_KERNEL));
	if (ret) {
		ctx->submitted--;
		dma_fence_put(&f->base);
		dma_fence_put(&f->base);
		mutex_unlock(&ctx->lock);
		drm_dev_exit(idx);
		return ret;
	}
	if (seqno > UMDEV_VGPU_FENCES_KEPT) {
		struct umdev_vgpu_fence *old = xa_erase(&ctx->fences, seqno - UMDEV_VGPU_FENCES_KEPT);

		if (old)
			dma_fence_put(&old->base);
	}
	spin_lock_irqsave(&ctx->fence_lock, flags);
	list_add_tail(&f->link, &ctx->pending);
	spin_unlock_irqrestore(&ctx->fence_lock, flags);

	cmd = ctx->ring + ctx->tail / 4;
	cmd[0] = UMDEV_VGPU_CMD(UMDEV_VGPU_OP_BATCH_START, 0, 3);
	cmd[1] = lower_32_bits(args->batch_va);
	cmd[2] = upper_32_bits(args->batch_va);
	cmd[3] = UMDEV_VGPU_CMD(UMDEV_VGPU_OP_FENCE, UMDEV_VGPU_FENCE_IRQ, 4);
	cmd[4] = lower_32_bits(UMDEV_VGPU_FENCE_VA);
	cmd[5] = upper_32_bits(UMDEV_VGPU_FENCE_VA);
	cmd[6] = seqno;
	cmd[7] = UMDEV_VGPU_CMD(UMDEV_VGPU_OP_NOP, 0, 1);
	ctx->tail = (ctx->tail + UMDEV_VGPU_SUBMIT_DWORDS * 4) & (UMDEV_VGPU_RING_SIZE - 1);
	/* The commands in guest RAM before the doorbell. */
	wmb();
	writel(ctx->tail, umdev_vgpu_ctx_reg(ctx, UMDEV_VGPU_CTX_RING_TAIL));
	mutex_unlock(&ctx->lock);
	drm_dev_exit(idx);
	args->seqno = seqno;
	drm_dbg(drm, "context %u: batch 0x%llx fence %u\n", ctx->id, args->batch_va, seqno);
	return 0;

err_unlock:
	mutex_unlock(&ctx->lock);
	drm_dev_exit(idx);
	kfree(f);
	return ret;
}

static int umdev_vgpu_ioctl_wait(struct drm_device *drm, void *data, struct drm_file *file)
{
	struct drm_umdev_vgpu_wait *args = data;
	struct umdev_vgpu_ctx *ctx;

	ctx = umdev_vgpu_file_ctx(file);
	if (IS_ERR(ctx))
		return PTR_ERR(ctx);
	args->fault_reason = 0;
	args->fault_addr = 0;
	return umdev_vgpu_ctx_wait(ctx, args->seqno, args->timeout_ns, &args->fault_reason,
				   &args->fault_addr);
}

static int umdev_vgpu_ioctl_info(struct drm_device *drm, void *data, struct drm_file *file)
{
	struct drm_umdev_vgpu_info *args = data;
	struct umdev_vgpu_ctx *ctx;

	ctx = umdev_vgpu_file_ctx(file);
	if (IS_ERR(ctx))
		return PTR_ERR(ctx);
	mutex_lock(&ctx->lock);
	args->context = ctx->id;
	args->faults = ctx->faults;
	args->bindings = ctx->nbindings;
	args->tables = ctx->tables;
	args->submitted = ctx->submitted;
	args->completed = READ_ONCE(*ctx->fence_page);
	mutex_unlock(&ctx->lock);
	return 0;
}

static int umdev_vgpu_ioctl_poke_pte(struct drm_device *drm, void *data, struct drm_file *file)
{
	struct drm_umdev_vgpu_poke_pte *args = data;
	struct umdev_vgpu_ctx *ctx;
	struct umdev_vgpu_pt *pt;

	if (!hostile_test)
		return -EPERM;
	if (args->level < 1 || args->level > UMDEV_VGPU_PT_LEVELS ||
	    args->va >= UMDEV_VGPU_VA_LIMIT || args->pad)
		return -EINVAL;
	ctx = umdev_vgpu_file_ctx(file);
	if (IS_ERR(ctx))
		return PTR_ERR(ctx);
	mutex_lock(&ctx->lock);
	pt = umdev_vgpu_pt_walk(ctx, args->va, args->level);
	if (pt)
		WRITE_ONCE(pt->entries[umdev_vgpu_pt_index(args->va, args->level)], args->value);
	umdev_vgpu_ctx_invalidate(ctx, 0, U64_MAX);
	mutex_unlock(&ctx->lock);
	drm_dbg(drm, "context %u: level %u entry for 0x%llx = 0x%llx (test)\n", ctx->id,
		args->level, args->va, args->value);
	return pt ? 0 : -ENOMEM;
}

static const struct drm_ioctl_desc umdev_vgpu_ioctls[] = {
	DRM_IOCTL_DEF_DRV(UMDEV_VGPU_VM_BIND, umdev_vgpu_ioctl_vm_bind, DRM_RENDER_ALLOW),
	DRM_IOCTL_DEF_DRV(UMDEV_VGPU_VM_UNBIND, umdev_vgpu_ioctl_vm_unbind, DRM_RENDER_ALLOW),
	DRM_IOCTL_DEF_DRV(UMDEV_VGPU_SUBMIT, umdev_vgpu_ioctl_submit, DRM_RENDER_ALLOW),
	DRM_IOCTL_DEF_DRV(UMDEV_VGPU_WAIT, umdev_vgpu_ioctl_wait, DRM_RENDER_ALLOW),
	DRM_IOCTL_DEF_DRV(UMDEV_VGPU_INFO, umdev_vgpu_ioctl_info, DRM_RENDER_ALLOW),
	DRM_IOCTL_DEF_DRV(UMDEV_VGPU_POKE_PTE, umdev_vgpu_ioctl_poke_pte, DRM_RENDER_ALLOW),
};

static int umdev_vgpu_open(struct drm_device *drm, struct drm_file *file)
{
	struct umdev_vgpu_file *priv = kzalloc(sizeof(*priv), GFP_KERNEL);

	if (!priv)
		return -ENOMEM;
	priv->vgpu = to_umdev_vgpu(drm);
	file->driver_priv = priv;
	return 0;
}

static void umdev_vgpu_postclose(struct drm_device *drm, struct drm_file *file)
{
	struct umdev_vgpu_file *priv = file->driver_priv;

	if (priv->ctx)
		umdev_vgpu_ctx_release(priv->ctx);
	kfree(priv);
}

/* MSI-X vectors for the contexts' interrupts (one each when there are four);
 * without them the engine is off and only the display works. */
static void umdev_vgpu_engine_init(struct umdev_vgpu *vgpu)
{
	struct pci_dev *pdev = vgpu->pdev;
	unsigned int n;
	int nvec, ret;

	mutex_init(&vgpu->ctx_lock);
	vgpu->contexts = min_t(unsigned int, UMDEV_VGPU_CAPS_CONTEXTS(vgpu->caps),
			       UMDEV_VGPU_CONTEXTS);
	for (n = 0; n < UMDEV_VGPU_CONTEXTS; n++) {
		vgpu->ctx[n].vgpu = vgpu;
		vgpu->ctx[n].id = n;
		mutex_init(&vgpu->ctx[n].lock);
		spin_lock_init(&vgpu->ctx[n].fence_lock);
	}
	ret = dma_set_mask_and_coherent(&pdev->dev, DMA_BIT_MASK(52));
	if (ret) {
		drm_warn(&vgpu->drm, "no 52-bit DMA (%d): engine off\n", ret);
		return;
	}
	pci_set_master(pdev);
	nvec = pci_alloc_irq_vectors(pdev, 1, UMDEV_VGPU_CONTEXTS, PCI_IRQ_MSIX);
	if (nvec < 0) {
		drm_warn(&vgpu->drm, "no MSI-X (%d): engine off\n", nvec);
		return;
	}
	for (n = 0; n < nvec; n++) {
		ret = request_threaded_irq(pci_irq_vector(pdev, n), NULL, umdev_vgpu_irq_thread,
					   IRQF_ONESHOT, "umdev_vgpu", vgpu);
		if (ret) {
			drm_warn(&vgpu->drm, "vector %u: %d: engine off\n", n, ret);
			while (n--)
				free_irq(pci_irq_vector(pdev, n), vgpu);
			pci_free_irq_vectors(pdev);
			return;
		}
	}
	vgpu->irq_vectors = nvec;
	vgpu->irq_enable = UMDEV_VGPU_IRQ_GLOBAL_ERROR;
	writel(vgpu->irq_enable, vgpu->mmio + UMDEV_VGPU_REG_IRQ_ENABLE);
	drm_info(&vgpu->drm, "engine: %u contexts, %d MSI-X vectors\n", vgpu->contexts, nvec);
}

/* Interrupts off and given back; the device reset (every register, the GGTT,
 * VRAM): nothing of this driver stays in the device. Contexts still held by
 * open files are freed when those close (their MMIO is skipped then). */
static void umdev_vgpu_engine_fini(struct umdev_vgpu *vgpu)
{
	unsigned int n;

	writel(0, vgpu->mmio + UMDEV_VGPU_REG_IRQ_ENABLE);
	for (n = 0; n < vgpu->irq_vectors; n++)
		free_irq(pci_irq_vector(vgpu->pdev, n), vgpu);
	if (vgpu->irq_vectors)
		pci_free_irq_vectors(vgpu->pdev);
	vgpu->irq_vectors = 0;
	writel(1, vgpu->mmio + UMDEV_VGPU_REG_RESET);
}

DEFINE_DRM_GEM_FOPS(umdev_vgpu_fops);

static const struct drm_driver umdev_vgpu_drm_driver = {
	.driver_features = DRIVER_MODESET | DRIVER_GEM | DRIVER_ATOMIC | DRIVER_RENDER,
	.open = umdev_vgpu_open,
	.postclose = umdev_vgpu_postclose,
	.ioctls = umdev_vgpu_ioctls,
	.num_ioctls = ARRAY_SIZE(umdev_vgpu_ioctls),
	.fops = &umdev_vgpu_fops,
	DRM_GEM_SHMEM_DRIVER_OPS,
	.name = "umdev_vgpu",
	.desc = "umdev mediated GPU",
	.date = "20261205",
	.major = 0,
	.minor = 1,
};

/* ----------------------------------------------------------- PCI device -- */

static int umdev_vgpu_probe(struct pci_dev *pdev, const struct pci_device_id *ent)
{
	struct umdev_vgpu *vgpu;
	resource_size_t vram_len;
	int ret;

	/* Freed by devres after remove (or a failed probe). */
	vgpu = devm_drm_dev_alloc(&pdev->dev, &umdev_vgpu_drm_driver,
				  struct umdev_vgpu, drm);
	if (IS_ERR(vgpu))
		return PTR_ERR(vgpu);
	vgpu->pdev = pdev;

	ret = pci_enable_device(pdev);
	if (ret) {
		dev_err(&pdev->dev, "cannot enable the device: %d\n", ret);
		return ret;
	}
	if (!(pci_resource_flags(pdev, UMDEV_VGPU_MMIO_BAR) & IORESOURCE_MEM) ||
	    !(pci_resource_flags(pdev, UMDEV_VGPU_VRAM_BAR) & IORESOURCE_MEM)) {
		dev_err(&pdev->dev, "BAR%d or BAR%d is not a memory BAR\n",
			UMDEV_VGPU_MMIO_BAR, UMDEV_VGPU_VRAM_BAR);
		ret = -ENODEV;
		goto err_disable;
	}
	ret = pci_request_region(pdev, UMDEV_VGPU_MMIO_BAR, KBUILD_MODNAME);
	if (ret) {
		dev_err(&pdev->dev, "BAR%d is busy: %d\n", UMDEV_VGPU_MMIO_BAR, ret);
		goto err_disable;
	}
	ret = pci_request_region(pdev, UMDEV_VGPU_VRAM_BAR, KBUILD_MODNAME);
	if (ret) {
		dev_err(&pdev->dev, "BAR%d is busy: %d\n", UMDEV_VGPU_VRAM_BAR, ret);
		goto err_release_mmio;
	}
	vgpu->mmio = pci_iomap(pdev, UMDEV_VGPU_MMIO_BAR, 0);
	if (!vgpu->mmio) {
		dev_err(&pdev->dev, "cannot map BAR%d\n", UMDEV_VGPU_MMIO_BAR);
		ret = -ENOMEM;
		goto err_release_vram;
	}

	vgpu->id = ioread32(vgpu->mmio + UMDEV_VGPU_REG_ID);
	if (vgpu->id != UMDEV_VGPU_ID_VALUE) {
		dev_err(&pdev->dev, "unexpected ID register 0x%08x (want 0x%08x)\n",
			vgpu->id, UMDEV_VGPU_ID_VALUE);
		ret = -ENODEV;
		goto err_unmap_mmio;
	}
	vgpu->caps = ioread32(vgpu->mmio + UMDEV_VGPU_REG_CAPS);
	vram_len = pci_resource_len(pdev, UMDEV_VGPU_VRAM_BAR);
	vgpu->vram_size = (resource_size_t)UMDEV_VGPU_CAPS_VRAM_MIB(vgpu->caps) * SZ_1M;
	if (vram_len != vgpu->vram_size) {
		dev_warn(&pdev->dev, "CAPS says %u MiB of VRAM, BAR%d is %pa bytes\n",
			 UMDEV_VGPU_CAPS_VRAM_MIB(vgpu->caps), UMDEV_VGPU_VRAM_BAR,
			 &vram_len);
		vgpu->vram_size = min(vgpu->vram_size, vram_len);
	}
	vgpu->vram = ioremap_wc(pci_resource_start(pdev, UMDEV_VGPU_VRAM_BAR),
				vgpu->vram_size);
	if (!vgpu->vram) {
		dev_err(&pdev->dev, "cannot map BAR%d\n", UMDEV_VGPU_VRAM_BAR);
		ret = -ENOMEM;
		goto err_unmap_mmio;
	}

	pci_set_drvdata(pdev, vgpu);
	dev_info(&pdev->dev, "%04x:%04x id=0x%08x vram=%u MiB contexts=%u\n",
		 pdev->vendor, pdev->device, vgpu->id,
		 UMDEV_VGPU_CAPS_VRAM_MIB(vgpu->caps),
		 UMDEV_VGPU_CAPS_CONTEXTS(vgpu->caps));

	/* Whatever a previous driver left in the device goes. */
	iowrite32(1, vgpu->mmio + UMDEV_VGPU_REG_RESET);
	umdev_vgpu_engine_init(vgpu);

	ret = umdev_vgpu_modeset_init(vgpu);
	if (ret) {
		dev_err(&pdev->dev, "mode setting init failed: %d\n", ret);
		goto err_engine;
	}
	ret = drm_dev_register(&vgpu->drm, 0);
	if (ret) {
		dev_err(&pdev->dev, "cannot register the DRM device: %d\n", ret);
		goto err_engine;
	}
	dev_info(&pdev->dev, "DRM device card%d (%s) registered\n",
		 vgpu->drm.primary->index, umdev_vgpu_drm_driver.name);
	drm_fbdev_shmem_setup(&vgpu->drm, 32);
	return 0;

err_engine:
	umdev_vgpu_engine_fini(vgpu);
	iounmap(vgpu->vram);
err_unmap_mmio:
	pci_iounmap(pdev, vgpu->mmio);
err_release_vram:
	pci_release_region(pdev, UMDEV_VGPU_VRAM_BAR);
err_release_mmio:
	pci_release_region(pdev, UMDEV_VGPU_MMIO_BAR);
err_disable:
	pci_disable_device(pdev);
	return ret;
}

static void umdev_vgpu_remove(struct pci_dev *pdev)
{
	struct umdev_vgpu *vgpu = pci_get_drvdata(pdev);

	/* No new DRM calls reach the hardware after this; then the display off. */
	drm_dev_unplug(&vgpu->drm);
	drm_atomic_helper_shutdown(&vgpu->drm);
	writel(0, vgpu->mmio + UMDEV_VGPU_SCANOUT_FB_ENABLE);
	umdev_vgpu_engine_fini(vgpu);
	iounmap(vgpu->vram);
	pci_iounmap(pdev, vgpu->mmio);
	pci_release_region(pdev, UMDEV_VGPU_VRAM_BAR);
	pci_release_region(pdev, UMDEV_VGPU_MMIO_BAR);
	pci_disable_device(pdev);
	dev_info(&pdev->dev, "removed\n");
}

static void umdev_vgpu_shutdown(struct pci_dev *pdev)
{
	struct umdev_vgpu *vgpu = pci_get_drvdata(pdev);

	drm_atomic_helper_shutdown(&vgpu->drm);
}

static const struct pci_device_id umdev_vgpu_ids[] = {
	{ PCI_DEVICE(UMDEV_VGPU_VENDOR_ID, UMDEV_VGPU_DEVICE_ID) },
	{ }
};
MODULE_DEVICE_TABLE(pci, umdev_vgpu_ids);

static struct pci_driver umdev_vgpu_driver = {
	.name = KBUILD_MODNAME,
	.id_table = umdev_vgpu_ids,
	.probe = umdev_vgpu_probe,
	.remove = umdev_vgpu_remove,
	.shutdown = umdev_vgpu_shutdown,
};
module_pci_driver(umdev_vgpu_driver);

MODULE_DESCRIPTION("umdev mediated GPU (PCI 1234:5547): DRM/KMS driver");
MODULE_LICENSE("GPL");
