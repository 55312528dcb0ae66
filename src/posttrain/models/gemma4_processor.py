"""Gemma 4's multimodal processor without torchvision (part of the Gemma 4 family's quirks).

Kept apart from `gemma4.py` only so that importing posttrain never imports Gemma 4's image
processing: on transformers 5.17 that module needs torchvision, which must not be installed
beside the CPU build of torch (PyPI's wheel breaks it).

The workaround (upstream: transformers #48558): without torchvision, transformers cannot build a
`Gemma4Processor` at all. `ProcessorMixin.__init__` type-checks every sub-processor, and looking
up `VideoProcessorMixin` (exported only with torchvision) raises AttributeError whatever is
passed; `AutoProcessor` loads the video processor eagerly. `Gemma4ProcessorWithoutVideo` accepts
`video_processor=None`, and nothing else changes: text, images and audio go through
transformers' own Gemma4Processor code; videos are refused. Tripwires in
tests/unit/test_tiny_variants.py fail once plain transformers can do this.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, Gemma4ImageProcessorPil, Gemma4Processor
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

from posttrain.models.processor_without_video import without_video


class Gemma4ProcessorWithoutVideo(without_video(Gemma4Processor)):
    """transformers' `Gemma4Processor` with `video_processor=None` (`without_video`), buildable
    without torchvision, saved in a released checkpoint's layout.

    Without torchvision, transformers 5.24 cannot build a `Gemma4Processor` at all:
    `ProcessorMixin.__init__` type-checks every sub-processor, and looking up
    `VideoProcessorMixin` (exported only with torchvision) raises AttributeError
    (processing_utils.py `check_argument_for_proper_class` -> `get_possibly_dynamic_module`),
    whatever is passed; `AutoProcessor` also loads the video processor eagerly (transformers
    #48558). This subclass accepts None for the video processor and nothing else changes: text,
    images and audio go through transformers' own Gemma4Processor code. Videos are refused.
    `tests/unit/test_tiny_variants.py` has tripwires that fail once plain transformers can do this.
    """

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        if videos is not None:
            raise ValueError("this Gemma 4 processor was built without a video processor (it needs torchvision)")
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> list[str]:
        """Tokenizer files plus `processor_config.json` in the layout of a released Gemma 4 checkpoint.

        The config names `Gemma4Processor` and carries a video-processor entry with the image
        settings, so that `AutoProcessor` can build the real class where torchvision is installed.
        """
        if push_to_hub or kwargs:
            raise TypeError("Gemma4ProcessorWithoutVideo.save_pretrained saves locally only")
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(save_directory)
        config = json.loads(self.to_json_string())
        config["processor_class"] = Gemma4Processor.__name__
        image = config["image_processor"]
        config["video_processor"] = {
            "video_processor_type": "Gemma4VideoProcessor",
            **{key: image[key] for key in ("patch_size", "max_soft_tokens", "pooling_kernel_size")},
        }
        path = save_directory / "processor_config.json"
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return [str(path)]




def load_gemma4_processor(path: str | Path) -> Gemma4ProcessorWithoutVideo:
    """A Gemma 4 checkpoint's processor (tokenizer + processor_config.json), built without torchvision.

    Reads the files a released Gemma 4 checkpoint has (tokenizer, `processor_config.json` with
    nested image-processor and feature-extractor settings); `AutoProcessor.from_pretrained`
    cannot load them without torchvision (see `Gemma4ProcessorWithoutVideo`).
    """
    path = Path(path)
    config = json.loads((path / "processor_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)  # Gemma 4's own tokenizer, never custom code
    return Gemma4ProcessorWithoutVideo(
        feature_extractor=Gemma4AudioFeatureExtractor.from_pretrained(path),
        image_processor=Gemma4ImageProcessorPil.from_pretrained(path),
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=tokenizer.chat_template,
        image_seq_length=config["image_seq_length"],
        audio_seq_length=config["audio_seq_length"],
        audio_ms_per_token=config["audio_ms_per_token"],
    )


