"""The image layer: CRIU image framing, checkpoint sources and the address-space layer."""

from criu_xstate.images.addrspace import AddressSpace
from criu_xstate.images.checkpoint import Checkpoint, open_checkpoint

__all__ = ["AddressSpace", "Checkpoint", "open_checkpoint"]
