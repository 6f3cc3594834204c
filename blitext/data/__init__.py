"""Datasets in: caption and VQA readers, image decoding, and preparation of the bundled data.

    records.py   ImageRecord / VQARecord / ImageSet: what every reader returns
    readers.py   read_image_set (LAVIS/COCO JSON, jsonl/csv folders, image folders, tar shards),
                 and the LAVIS caption writer
    webdataset.py  img2dataset-style .tar shards: members grouped into samples (image, caption, key)
    vqa.py       read_vqa (VQAv2, OK-VQA, GQA) and the VQAv2 writer
    images.py    bytes from files or tar members, decoded to RGB; bad images -> BadInputError
    prepare.py   easy-vqa, tuxpaint, fashion-mnist, moving-shapes -> images/videos + caption/VQA JSON on disk
    video.py     videos decoded with PyAV at 25 fps, cut into segments; the VATEX caption reader
    moving_shapes.py  the generated captioned .mp4 clip set
"""
from blitext.data.images import decode_image, load_image, read_image_bytes
from blitext.data.prepare import list_datasets, prepare_dataset
from blitext.data.readers import read_image_set, write_lavis_json
from blitext.data.vqa import read_vqa, write_vqa_json
from blitext.data.records import ImageRecord, ImageSet, VQARecord

__all__ = [
    "ImageRecord", "ImageSet", "VQARecord", "decode_image", "list_datasets", "load_image", "prepare_dataset",
    "read_image_bytes", "read_image_set", "read_vqa", "write_lavis_json", "write_vqa_json",
]
