from medseg import lean_imports

__version__ = "0.1.0"

lean_imports.install()  # MONAI without the optional integrations medseg never uses (medseg/lean_imports.py)
