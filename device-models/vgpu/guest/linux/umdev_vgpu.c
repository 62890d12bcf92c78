// SPDX-License-Identifier: GPL-2.0
/*
 * umdev_vgpu: Linux PCI driver for umdev's mediated GPU (PCI 1234:5547,
 * programming model in device-models/vgpu/SPEC.md of the umdev repository).
 *
 * Binds to the device, maps BAR0 (registers, GGTT), checks the ID register and
 * reports the VRAM size, then registers a DRM/KMS device with one display:
 * framebuffers are shmem GEM objects in guest RAM; every update copies the
 * damaged rectangles into VRAM (BAR2), which the GGTT maps for scanout 0. No
 * command submission (rendering engine) yet.
 */
#include <linux/io.h>
#include <linux/iosys-map.h>
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/sizes.h>

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
#include <drm/drm_managed.h>
#include <drm/drm_modeset_helper_vtables.h>
#include <drm/drm_probe_helper.h>
#include <drm/drm_simple_kms_helper.h>

#define UMDEV_VGPU_VENDOR_ID	0x1234
#define UMDEV_VGPU_DEVICE_ID	0x5547

/* BARs (SPEC.md "BARs"). */
#define UMDEV_VGPU_MMIO_BAR	0
#define UMDEV_VGPU_VRAM_BAR	2

/* BAR0 registers (SPEC.md "Registers"; crates/umdev-vgpu-abi/src/regs.rs). */
#define UMDEV_VGPU_REG_ID	0x00
#define UMDEV_VGPU_REG_CAPS	0x04
#define UMDEV_VGPU_ID_VALUE	0x55470001
/* CAPS: bits 0-7 contexts, 8-15 log2 GGTT entries, 16-31 VRAM in MiB. */
#define UMDEV_VGPU_CAPS_CONTEXTS(c)	((c) & 0xff)
#define UMDEV_VGPU_CAPS_VRAM_MIB(c)	((c) >> 16)

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

DEFINE_DRM_GEM_FOPS(umdev_vgpu_fops);

static const struct drm_driver umdev_vgpu_drm_driver = {
	.driver_features = DRIVER_MODESET | DRIVER_GEM | DRIVER_ATOMIC,
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

	ret = umdev_vgpu_modeset_init(vgpu);
	if (ret) {
		dev_err(&pdev->dev, "mode setting init failed: %d\n", ret);
		goto err_unmap_vram;
	}
	ret = drm_dev_register(&vgpu->drm, 0);
	if (ret) {
		dev_err(&pdev->dev, "cannot register the DRM device: %d\n", ret);
		goto err_unmap_vram;
	}
	dev_info(&pdev->dev, "DRM device card%d (%s) registered\n",
		 vgpu->drm.primary->index, umdev_vgpu_drm_driver.name);
	drm_fbdev_shmem_setup(&vgpu->drm, 32);
	return 0;

err_unmap_vram:
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
