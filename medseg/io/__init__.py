"""Medical image I/O: the :class:`Volume` type, readers/writers and dataset discovery."""

from medseg.io.nifti import read_nifti, write_nifti
from medseg.io.volume import Volume

__all__ = ["Volume", "read_nifti", "write_nifti"]
