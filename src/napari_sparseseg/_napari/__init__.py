"""The napari front door: dock widget tabs, thread workers, sample data. Only translates layers
into engine calls (``napari_sparseseg.core``)."""
