"""Semantic segmentation on PASCAL VOC with FCN-8s, PAC layers (PacFCN) and PacCRF.

Modules: ``fcn8s`` (backbones), ``models`` (wrappers, CRF models, the model-name grammar and
``create_model``), ``datasets`` (VOC2012 / SBD / VOC2011 lists, DeepLab transforms), ``synthetic``
(generated demo data), ``prepare_sbd`` (SBD .mat -> PNG), ``metrics``, ``palette``, ``main`` (the
training / evaluation program: ``python -m task_semanticSegmentation.main --help``) and ``demo``
(the CPU demo on Synthetic data).
"""
