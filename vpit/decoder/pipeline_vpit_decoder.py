"""`VPiTDecoderPipeline`: visual tokens (or an image, through the vision encoder) -> pixels.

    image ──► vision encoder (optional, frozen) ──► z (B, K, Dv) ──► projector ──► context (B, L, D)
                                                                                    │ cross-attention
    noise (B, C, h, w) ──► UNet ⟲ scheduler, classifier-free guidance vs. the zero context ──► VAE decode ──► image

Latent diffusion when a VAE is present (SD 1.5: C = 4, h = H / 8), pixel space when it is absent (C = 3, h = H).

Loading. `save_pretrained` writes a diffusers folder: model_index.json names this class and each component's
library; diffusers components record `diffusers`, vpit's record their module path (`vpit.decoder.projector`,
`vpit.decoder.vision_encoder`), which diffusers resolves from the modules already imported — no remote code and no
`trust_remote_code`. `DiffusionPipeline.from_pretrained` resolves model_index.json's `_class_name` as an attribute of
the `diffusers` module, so `import vpit` (or `vpit.decoder`) registers this class there (`register_with_diffusers`).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any, cast

import diffusers
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import AutoConfig

from .projector import VPiTDecoderProjector
from .vision_encoder import VPiTVisionEncoderModel

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class VPiTDecoderPipeline(DiffusionPipeline):
    """The VPiT diffusion autoencoder: a UNet conditioned on K visual tokens through a projector.

    Args:
        unet: a `UNet2DConditionModel` whose `cross_attention_dim` is the projector's D.
        scheduler: any diffusers scheduler (DDIM, PNDM, Euler, ...).
        projector: `VPiTDecoderProjector`, (B, K, Dv) -> (B, L, D).
        vae: an `AutoencoderKL` for latent diffusion; None: the UNet denoises pixels.
        vision_encoder: `VPiTVisionEncoderModel`, needed only to pass `image=` (encode, then reconstruct).
        base_model: where the UNet / VAE / scheduler came from (a Hub id or folder), for the model card.

    Example:
        >>> pipe = VPiTDecoderPipeline.from_text_to_image_pipeline(
        ...     "stable-diffusion-v1-5/stable-diffusion-v1-5", vision_hidden_size=1152, num_visual_tokens=64
        ... )
        >>> images = pipe(visual_tokens=torch.randn(1, 64, 1152), guidance_scale=7.5).images
    """

    model_cpu_offload_seq = "vision_encoder->projector->unet->vae"  # type: ignore[assignment]  # None in the base
    _optional_components = ["vae", "vision_encoder"]  # noqa: RUF012 (diffusers reads this class attribute)
    # Set by `register_modules`; declared for readers and type checkers.
    unet: UNet2DConditionModel
    scheduler: Any  # SchedulerMixin declares none of step / set_timesteps / init_noise_sigma
    projector: VPiTDecoderProjector
    vae: AutoencoderKL | None
    vision_encoder: VPiTVisionEncoderModel | None

    def __init__(
        self,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        projector: VPiTDecoderProjector,
        vae: AutoencoderKL | None = None,
        vision_encoder: VPiTVisionEncoderModel | None = None,
        base_model: str | None = None,
    ):
        super().__init__()
        if unet.config["cross_attention_dim"] != projector.config["cross_attention_dim"]:
            raise ValueError(
                f"projector.cross_attention_dim ({projector.config['cross_attention_dim']}) must equal the UNet's "
                f"cross_attention_dim ({unet.config['cross_attention_dim']})"
            )
        space_channels = vae.config["latent_channels"] if vae is not None else 3
        spatial = projector.spatial_channels
        if unet.config["in_channels"] != space_channels + spatial or unet.config["out_channels"] != space_channels:
            where = "the VAE's latent_channels" if vae is not None else "3 (pixel space: no VAE)"
            raise ValueError(
                f"unet.in_channels / out_channels ({unet.config['in_channels']} / {unet.config['out_channels']}) must "
                f"equal {where} ({space_channels}) + the projector's spatial_channels ({spatial}) / {space_channels}"
            )
        if vision_encoder is not None and vision_encoder.hidden_size != projector.config["vision_hidden_size"]:
            raise ValueError(
                f"the vision encoder emits Dv = {vision_encoder.hidden_size} but projector.vision_hidden_size is "
                f"{projector.config['vision_hidden_size']}"
            )
        k = vision_encoder.encoder.num_visual_tokens if vision_encoder is not None else None
        if k is not None and k != projector.config["num_visual_tokens"]:
            raise ValueError(
                f"the vision encoder emits K = {k} visual tokens but projector.num_visual_tokens is "
                f"{projector.config['num_visual_tokens']}"
            )
        self.register_modules(
            unet=unet, scheduler=scheduler, projector=projector, vae=vae, vision_encoder=vision_encoder
        )
        self.register_to_config(base_model=base_model)
        self.vae_scale_factor = 2 ** (len(vae.config["block_out_channels"]) - 1) if vae is not None else 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ------------------------------------------------------------------------------------------ construction

    @classmethod
    def from_text_to_image_pipeline(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        vision_hidden_size: int,
        num_visual_tokens: int,
        projector_hidden_size: int = 2048,
        projector_type: str = "mlp",
        num_queries: int | None = None,
        vision_encoder: VPiTVisionEncoderModel | None = None,
        scheduler: SchedulerMixin | None = None,
        torch_dtype: torch.dtype | None = None,
        spatial_channels: int = 0,
        **kwargs: Any,
    ) -> VPiTDecoderPipeline:
        """Start from a pretrained text-to-image folder or Hub id (Stable Diffusion 1.x layout).

        Keeps its UNet, VAE and scheduler; never loads its text encoder, tokenizer or safety checker (only the
        text encoder's config.json is read, for the context length L it was trained with: 77 for SD 1.5). A new
        projector maps (B, K, Dv) visual tokens to (B, L, D), D being the UNet's `cross_attention_dim`.

        Args:
            pretrained_model_name_or_path: a diffusers text-to-image folder or Hub id.
            vision_hidden_size: Dv of the visual tokens (1152 for SigLIP SO400M).
            num_visual_tokens: K (64 in MetaMorph).
            projector_hidden_size: the projector MLP's hidden width (2048 in MetaMorph).
            projector_type: 'mlp' or 'query'.
            num_queries: Nq for the 'query' projector.
            vision_encoder: optional encoder component, for `image=` reconstruction.
            scheduler: replaces the folder's scheduler (e.g. DDIM for sampling).
            torch_dtype: dtype of the UNet, VAE and projector.
            spatial_channels: C > 0 adds the projector's spatial map (see `VPiTDecoderProjector`); the UNet's
                `conv_in` gets C more input channels with zero weights, as InstructPix2Pix widens it, so the
                pretrained UNet starts out computing exactly what it did.
            kwargs: passed to each component's `from_pretrained` (revision, variant, cache_dir, token, ...).
        """
        source = os.fspath(pretrained_model_name_or_path)
        # load_config returns the dict alone unless asked for more (its annotation says a tuple).
        index = cast(dict[str, Any], DiffusionPipeline.load_config(source, **_config_kwargs(kwargs)))
        missing = [name for name in ("unet", "scheduler") if not _declared(index, name)]
        if missing:
            raise ValueError(
                f"{source} has no {' or '.join(missing)} in its model_index.json; it is not a "
                "text-to-image diffusers folder (expected the Stable Diffusion layout)"
            )
        load = {"torch_dtype": torch_dtype, **kwargs}
        unet = _component_class(index, "unet").from_pretrained(source, subfolder="unet", **load)
        if spatial_channels:
            _widen_conv_in(unet, spatial_channels)
        vae = (
            _component_class(index, "vae").from_pretrained(source, subfolder="vae", **load)
            if _declared(index, "vae")
            else None
        )
        if scheduler is None:
            scheduler = _component_class(index, "scheduler").from_pretrained(
                source, subfolder="scheduler", **_config_kwargs(kwargs)
            )
        projector = VPiTDecoderProjector(
            vision_hidden_size=vision_hidden_size,
            cross_attention_dim=unet.config["cross_attention_dim"],
            num_visual_tokens=num_visual_tokens,
            hidden_size=projector_hidden_size,
            context_length=_text_context_length(source, index, kwargs),
            projector_type=projector_type,
            num_queries=num_queries,
            spatial_channels=spatial_channels,
        )
        if torch_dtype is not None:
            projector.to(torch_dtype)
        return cls(
            unet=unet,
            scheduler=scheduler,
            projector=projector,
            vae=vae,
            vision_encoder=vision_encoder,
            base_model=source,
        )

    def check_condition(self, num_tokens: int, width: int, source: str) -> None:
        """Refuse, with the fix, a source of condition tokens (num_tokens, width) other than what the projector reads
        (num_visual_tokens, vision_hidden_size), e.g. a 'queries' model's Q condition tokens of width C."""
        k, dv = self.projector.config["num_visual_tokens"], self.projector.config["vision_hidden_size"]
        if (num_tokens, width) != (k, dv):
            raise ValueError(
                f"{source} makes condition tokens of shape ({num_tokens}, {width}) but this decoder's projector reads "
                f"({k}, {dv}) (num_visual_tokens, vision_hidden_size): pair it with a decoder built for that size, "
                f"or set the model's num_queries / condition_size to ({k}, {dv})"
            )

    # ------------------------------------------------------------------------------------------ inference

    @torch.no_grad()
    def encode_image(self, image: Image.Image | Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """PIL image(s), or (B, 3, S, S) pixels already preprocessed for the encoder -> (B, K, Dv) visual tokens."""
        if self.vision_encoder is None:
            raise ValueError(
                "image= needs a vision encoder component; build the pipeline with "
                "vision_encoder=VPiTVisionEncoderModel.from_vision_encoder(...) or pass visual_tokens= instead"
            )
        if isinstance(image, torch.Tensor):
            pixel_values = image.to(self.vision_encoder.device)
        else:
            pixel_values = self.vision_encoder.preprocess(image)
        return self.vision_encoder(pixel_values)

    def _extra_step_kwargs(self, generator: torch.Generator | list[torch.Generator] | None, eta: float) -> dict:
        """eta and generator for schedulers whose `step` takes them (DDIM: eta; DDPM, Euler a: generator)."""
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        extra: dict[str, Any] = {}
        if "eta" in accepted:
            extra["eta"] = eta
        if "generator" in accepted:
            extra["generator"] = generator
        return extra

    @torch.no_grad()
    def __call__(
        self,
        visual_tokens: torch.Tensor | None = None,
        image: Image.Image | Sequence[Image.Image] | torch.Tensor | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_condition: int = 1,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Decode visual tokens (or encode `image` first) into images.

        Args:
            visual_tokens: (B, K, Dv) visual tokens (e.g. predicted by a VPiT model); exclusive with `image`.
            image: PIL image(s) or encoder-preprocessed (B, 3, S, S) pixels to encode and reconstruct.
            num_inference_steps: denoising steps.
            guidance_scale: s in ε = ε(∅) + s · (ε(c) − ε(∅)), ∅ being the all-zero context; s <= 1 runs the
                conditional branch alone (s = 1 is exactly the conditional prediction).
            num_images_per_condition: samples per condition; the output holds B * this many images.
            height, width: output size in pixels; default the UNet's sample_size times the VAE scale factor.
            generator: torch generator(s) for the initial noise and stochastic schedulers.
            latents: (B', C, h, w) initial noise to start from instead of sampling it.
            eta: DDIM's η (ignored by other schedulers).
            output_type: 'pil', 'np', 'pt' (images in [0, 1]) or 'latent' (the final latents).
            return_dict: return an `ImagePipelineOutput` rather than a tuple.

        Example:
            >>> pipe(visual_tokens=z, num_inference_steps=25, guidance_scale=7.5, generator=torch.manual_seed(0))
        """
        if (visual_tokens is None) == (image is None):
            raise ValueError("pass exactly one of visual_tokens= (B, K, Dv) and image= (PIL image(s) or pixels)")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
        if num_inference_steps < 1 or num_images_per_condition < 1:
            raise ValueError("num_inference_steps and num_images_per_condition must be >= 1")
        device = self._execution_device
        if image is not None:
            visual_tokens = self.encode_image(image)
        assert visual_tokens is not None  # one of the two was given, checked above
        condition = self.projector(visual_tokens.to(device))  # (B, L, D)
        condition = condition.repeat_interleave(num_images_per_condition, dim=0)  # (B', L, D)
        batch = condition.shape[0]
        do_guidance = guidance_scale > 1.0
        if do_guidance:
            condition = torch.cat([torch.zeros_like(condition), condition])  # (2B', L, D): [∅, c]
        condition = condition.to(self.unet.dtype)

        height = height or self.unet.config["sample_size"] * self.vae_scale_factor
        width = width or self.unet.config["sample_size"] * self.vae_scale_factor
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}, got {height}x{width}")
        shape = (
            batch,
            self.unet.config["out_channels"],
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        spatial = None
        if self.projector.spatial_channels:
            spatial = self.projector.spatial_condition(visual_tokens.to(device), shape[-2:])  # (B, C', h, w)
            spatial = spatial.repeat_interleave(num_images_per_condition, dim=0).to(self.unet.dtype)
            if do_guidance:
                spatial = torch.cat([torch.zeros_like(spatial), spatial])  # [∅, c], as the context
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device) * self.scheduler.init_noise_sigma  # (B', C, h, w)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        extra = self._extra_step_kwargs(generator, eta)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if do_guidance else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            if spatial is not None:
                model_input = torch.cat([model_input, spatial], dim=1)
            prediction = self.unet(model_input, t, encoder_hidden_states=condition, return_dict=False)[0]
            if do_guidance:
                unconditional, conditional = prediction.chunk(2)
                prediction = unconditional + guidance_scale * (conditional - unconditional)
            latents = self.scheduler.step(prediction, t, latents, **extra, return_dict=False)[0]

        if output_type == "latent":
            images: Any = latents
        else:
            if self.vae is not None:
                scaled = latents / self.vae.config["scaling_factor"]
                if self.vae.config.get("shift_factor") is not None:
                    scaled = scaled + self.vae.config["shift_factor"]
                pixels = self.vae.decode(scaled.to(self.vae.dtype), return_dict=False)[0]  # (B', 3, H, W)
            else:
                pixels = latents
            images = self.image_processor.postprocess(pixels, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


# ---------------------------------------------------------------------------------------------- helpers


def _widen_conv_in(unet: Any, extra: int) -> None:
    """Give the UNet's first convolution `extra` more input channels with zero weights (the pretrained channels
    unchanged), and record the new `in_channels` in its config."""
    old = unet.conv_in
    new = torch.nn.Conv2d(
        old.in_channels + extra, old.out_channels, old.kernel_size, old.stride, old.padding, device=old.weight.device
    ).to(old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        if old.bias is not None and new.bias is not None:
            new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=new.in_channels)


def _declared(index: dict[str, Any], name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and entry[0] is not None


def _component_class(index: dict[str, Any], name: str) -> Any:
    """The diffusers class model_index.json names for `name` (only diffusers classes: no code is imported)."""
    library, class_name = index[name]
    if library != "diffusers" or not hasattr(diffusers, class_name):
        raise ValueError(
            f"the {name} of this text-to-image folder is [{library!r}, {class_name!r}]; only diffusers classes are "
            "supported (load it yourself and build VPiTDecoderPipeline(...) from the parts)"
        )
    return getattr(diffusers, class_name)


_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")


def _config_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The download arguments among `kwargs` (what `load_config` accepts)."""
    return {k: v for k, v in kwargs.items() if k in _HUB_KWARGS}


def _text_context_length(source: str, index: dict[str, Any], kwargs: dict[str, Any]) -> int | None:
    """The context length the UNet was trained with: the text encoder's max_position_embeddings (77 for SD 1.5),
    read from text_encoder/config.json alone (no weights); None when the folder has no text encoder."""
    if not _declared(index, "text_encoder"):
        return None
    text_config = AutoConfig.from_pretrained(source, subfolder="text_encoder", **_config_kwargs(kwargs))
    length = getattr(text_config.get_text_config(), "max_position_embeddings", None)
    return int(length) if length else None


def register_with_diffusers() -> None:
    """Let `DiffusionPipeline.from_pretrained(folder)` find this class.

    diffusers resolves model_index.json's `_class_name` as an attribute of the `diffusers` module
    (`pipeline_loading_utils._get_pipeline_class`); for a pipeline defined elsewhere its only other route is remote
    code (`trust_remote_code=True` and a .py file in the folder). Idempotent; run at `import vpit.decoder`.
    """
    name = VPiTDecoderPipeline.__name__
    existing = diffusers.__dict__.get(name)
    if existing is not None and existing is not VPiTDecoderPipeline:
        raise RuntimeError(f"diffusers already defines {name} ({existing!r}); refusing to shadow it")
    setattr(diffusers, name, VPiTDecoderPipeline)


__all__ = ["VPiTDecoderPipeline", "register_with_diffusers"]
