// SPDX-License-Identifier: GPL-2.0
/*
 * umdev_vgpu: Linux PCI driver for umdev's mediated GPU (PCI 1234:5547,
 * programming model in device-models/vgpu/SPEC.md of the umdev repository).
 *
 * First step: bind to the device, enable it, map the register BAR (BAR0),
 * check the identification register and report the VRAM size. No DRM yet.
 */
#include <linux/io.h>
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/sizes.h>

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

struct umdev_vgpu {
	struct pci_dev *pdev;
	void __iomem *mmio;
	u32 id;
	u32 caps;
};

static int umdev_vgpu_probe(struct pci_dev *pdev, const struct pci_device_id *ent)
{
	struct umdev_vgpu *vgpu;
	resource_size_t vram_len;
	int ret;

	vgpu = kzalloc(sizeof(*vgpu), GFP_KERNEL);
	if (!vgpu)
		return -ENOMEM;
	vgpu->pdev = pdev;

	ret = pci_enable_device(pdev);
	if (ret) {
		dev_err(&pdev->dev, "cannot enable the device: %d\n", ret);
		goto err_free;
	}
	if (!(pci_resource_flags(pdev, UMDEV_VGPU_MMIO_BAR) & IORESOURCE_MEM)) {
		dev_err(&pdev->dev, "BAR%d is not a memory BAR\n", UMDEV_VGPU_MMIO_BAR);
		ret = -ENODEV;
		goto err_disable;
	}
	ret = pci_request_region(pdev, UMDEV_VGPU_MMIO_BAR, KBUILD_MODNAME);
	if (ret) {
		dev_err(&pdev->dev, "BAR%d is busy: %d\n", UMDEV_VGPU_MMIO_BAR, ret);
		goto err_disable;
	}
	vgpu->mmio = pci_iomap(pdev, UMDEV_VGPU_MMIO_BAR, 0);
	if (!vgpu->mmio) {
		dev_err(&pdev->dev, "cannot map BAR%d\n", UMDEV_VGPU_MMIO_BAR);
		ret = -ENOMEM;
		goto err_release;
	}

	vgpu->id = ioread32(vgpu->mmio + UMDEV_VGPU_REG_ID);
	if (vgpu->id != UMDEV_VGPU_ID_VALUE) {
		dev_err(&pdev->dev, "unexpected ID register 0x%08x (want 0x%08x)\n",
			vgpu->id, UMDEV_VGPU_ID_VALUE);
		ret = -ENODEV;
		goto err_unmap;
	}
	vgpu->caps = ioread32(vgpu->mmio + UMDEV_VGPU_REG_CAPS);
	vram_len = pci_resource_len(pdev, UMDEV_VGPU_VRAM_BAR);
	if (vram_len != (resource_size_t)UMDEV_VGPU_CAPS_VRAM_MIB(vgpu->caps) * SZ_1M)
		dev_warn(&pdev->dev, "CAPS says %u MiB of VRAM, BAR%d is %pa bytes\n",
			 UMDEV_VGPU_CAPS_VRAM_MIB(vgpu->caps), UMDEV_VGPU_VRAM_BAR,
			 &vram_len);

	pci_set_drvdata(pdev, vgpu);
	dev_info(&pdev->dev, "%04x:%04x id=0x%08x vram=%u MiB contexts=%u\n",
		 pdev->vendor, pdev->device, vgpu->id,
		 UMDEV_VGPU_CAPS_VRAM_MIB(vgpu->caps),
		 UMDEV_VGPU_CAPS_CONTEXTS(vgpu->caps));
	return 0;

err_unmap:
	pci_iounmap(pdev, vgpu->mmio);
err_release:
	pci_release_region(pdev, UMDEV_VGPU_MMIO_BAR);
err_disable:
	pci_disable_device(pdev);
err_free:
	kfree(vgpu);
	return ret;
}

static void umdev_vgpu_remove(struct pci_dev *pdev)
{
	struct umdev_vgpu *vgpu = pci_get_drvdata(pdev);

	pci_iounmap(pdev, vgpu->mmio);
	pci_release_region(pdev, UMDEV_VGPU_MMIO_BAR);
	pci_disable_device(pdev);
	kfree(vgpu);
	dev_info(&pdev->dev, "removed\n");
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
};
module_pci_driver(umdev_vgpu_driver);

MODULE_DESCRIPTION("umdev mediated GPU (PCI 1234:5547)");
MODULE_LICENSE("GPL");
