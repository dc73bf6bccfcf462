"""Device meshes and logical axis rules: how arrays and batches are laid out over devices and hosts."""
