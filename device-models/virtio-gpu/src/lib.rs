//! virtio-gpu 2D over vhost-user (in progress).
