"""Before the stages: the frozen encoders run once, their features cached in sharded HDF5.

    image.py     extract-features: a frozen image encoder over an image set (ViT / EVA / CLIP)
    video.py     extract-video: I3D clip features for each video segment
    imported.py  import-features: features computed elsewhere (.npy / .npz / HDF5) made into a cache
"""
