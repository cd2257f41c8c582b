"""DICOMweb (PS3.18) on the hub: QIDO-RS search, WADO-RS retrieve and STOW-RS store."""
