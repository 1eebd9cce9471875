"""Into the hospital workflow: DICOMweb pull and push (:mod:`medseg.pacs.dicomweb`), the series selection rules
(:mod:`medseg.pacs.selection`) and the DICOM listener (:mod:`medseg.pacs.listener`)."""
