"""A vision-language processor without its video processor, buildable without torchvision.

The generic family's counterpart of `gemma4_processor.py`, for the same upstream problem
(transformers #48558): without torchvision, `ProcessorMixin.__init__` type-checks every
sub-processor and looking up the video-processor base class (exported only with torchvision)
raises AttributeError whatever is passed, and `AutoProcessor` loads the video processor eagerly.
`without_video(cls)` is the checkpoint's own processor class accepting `video_processor=None`:
text and images go through transformers' code unchanged (the image processor's PIL backend, which
transformers falls back to without torchvision); videos are refused. Where torchvision is
installed, `load_processor_without_video` is plain `AutoProcessor`.
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, ProcessorMixin
from transformers.utils import is_torchvision_available

PROCESSOR_CONFIG = "processor_config.json"


def without_video(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    class WithoutVideo(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

        def __call__(self, *args, videos=None, **kwargs):
            if videos is not None:
                raise ValueError(f"this {processor_class.__name__} was built without a video processor (it needs torchvision)")
            return super().__call__(*args, **kwargs)

        def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> list[str]:
            """The tokenizer, the image processor and a processor config naming the real class (so
            that AutoProcessor builds it where torchvision is installed)."""
            if push_to_hub or kwargs:
                raise TypeError(f"{type(self).__name__}.save_pretrained saves locally only")
            save_directory = Path(save_directory)
            save_directory.mkdir(parents=True, exist_ok=True)
            self.tokenizer.save_pretrained(save_directory)
            self.image_processor.save_pretrained(save_directory)
            path = save_directory / PROCESSOR_CONFIG
            path.write_text(json.dumps({"processor_class": processor_class.__name__}, indent=2) + "\n")
            return [str(path)]

    WithoutVideo.__name__ = WithoutVideo.__qualname__ = f"{processor_class.__name__}WithoutVideo"
    return WithoutVideo


def build_without_video(processor_class: type[ProcessorMixin], image_processor, tokenizer) -> ProcessorMixin:
    return without_video(processor_class)(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=tokenizer.chat_template
    )


def load_processor_without_video(path: str | Path) -> ProcessorMixin:
    """A checkpoint's processor: AutoProcessor with torchvision, else its class without video."""
    path = Path(path)
    if is_torchvision_available():
        return AutoProcessor.from_pretrained(path, trust_remote_code=False)  # a family's own classes: no checkpoint code
    names = [json.loads(p.read_text()).get("processor_class") for p in (path / PROCESSOR_CONFIG, path / "preprocessor_config.json") if p.exists()]
    name = next((n for n in names if n), None)
    if name is None or not hasattr(transformers, name):
        raise ValueError(f"{path}: no processor class named in {PROCESSOR_CONFIG} or preprocessor_config.json (got {name!r})")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    # the class the image processor was saved as (older transformers' AutoImageProcessor wants torchvision)
    image_config = json.loads((path / "preprocessor_config.json").read_text())
    image_class = getattr(transformers, image_config.get("image_processor_type", ""), None)
    image_processor = (
        image_class.from_pretrained(path, trust_remote_code=False)
        if image_class is not None
        else AutoImageProcessor.from_pretrained(path, trust_remote_code=False)
    )
    return build_without_video(getattr(transformers, name), image_processor, tokenizer)
