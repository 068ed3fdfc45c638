"""Datasets and Lightning data modules: MovingDigits, folders of videos and images, and the shared loaders."""

from timeloom.data.datamodule import (
    ImageFolderDataModule,
    MovingDigitsDataModule,
    TimeloomDataModule,
    VideoFolderDataModule,
    collate_batch,
)
from timeloom.data.joint import AlternatingLoader, JointDataModule, Photos, PhotosDataModule
from timeloom.data.loader import make_eval_loader, make_train_loader
from timeloom.data.moving_digits import MovingDigits, render_digits
from timeloom.data.video_folder import ImageFolder, VideoFolder

__all__ = [
    "AlternatingLoader",
    "ImageFolder",
    "ImageFolderDataModule",
    "JointDataModule",
    "MovingDigits",
    "MovingDigitsDataModule",
    "Photos",
    "PhotosDataModule",
    "TimeloomDataModule",
    "VideoFolder",
    "VideoFolderDataModule",
    "collate_batch",
    "make_eval_loader",
    "make_train_loader",
    "render_digits",
]
