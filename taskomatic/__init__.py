"""taskomatic: runs queued virtualization tasks from PostgreSQL on libvirt nodes."""

__version__ = "0.1.0"
