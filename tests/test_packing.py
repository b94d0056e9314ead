"""Packed latents (Flux, Qwen-Image): decode unpacks them and encode packs them as the pipelines do,
checked against the pipelines' own `_pack_latents` / `_unpack_latents` (compiled from diffusers' source
files: the pipelines themselves need the transformers library) and their decoding steps."""
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

import flowsolve as fs
from flowsolve.sample import initial_noise
from flowsolve.models.packing import packed_grid, packed_shape, patch_size
from conftest import peer_function
from test_pipeline_models import _flux, _flux_ids


def _peer_method(relpath: str, cls: str, name: str):
    return peer_function(relpath, name, cls)


def test_patch_size_and_grid():
    assert patch_size(64, 16) == 2 and patch_size(16, 4) == 2 and patch_size(144, 16) == 3
    assert patch_size(16, 16) is None and patch_size(9, 4) is None and patch_size(384, 16) is None
    assert patch_size(None, 16) is None
    img_ids, _ = _flux_ids(2, 3, 1)
    assert packed_grid({"img_ids": img_ids}) == (2, 3)
    assert packed_grid({"img_ids": img_ids[None].expand(2, -1, -1)}) == (2, 3)
    assert packed_grid({"img_shapes": [[(1, 4, 5)]] * 2}) == (4, 5)
    assert packed_grid({"img_shapes": [[(1, 4, 5), (1, 6, 6)]]}) == (4, 5)  # Qwen-Image Edit: + the reference
    assert packed_grid({}) is None
    ids = {"img_ids": img_ids}
    assert packed_shape({"in_channels": 64}, ids) == (6, 64)  # Flux
    assert packed_shape({"in_channels": 384, "out_channels": 64}, ids) == (6, 64)  # Flux Fill: + mask, image
    assert packed_shape({"in_channels": 64, "out_channels": 16}, ids) == (6, 64)  # Qwen-Image: out counts c
    assert packed_shape({"in_channels": 64}, {}) is None


def test_flux_latents_decode_and_encode_as_its_pipeline():
    """FluxPipeline: latents (b, (h/2)(w/2), 4c) are unpacked, un-normalised (/ scaling_factor +
    shift_factor) and decoded; encode is its img2img's: normalised, then packed."""
    net = _flux()  # 16 input channels: 2 × 2 patches of a 4-channel VAE
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8,), latent_channels=4, norm_num_groups=8,
                        scaling_factor=0.3611, shift_factor=0.1159).eval()
    img_ids, txt_ids = _flux_ids(2, 3, 3)
    m = fs.models.from_diffusers(net, FlowMatchEulerDiscreteScheduler(), vae=vae, img_ids=img_ids, txt_ids=txt_ids,
                                 guidance=torch.tensor([3.5]))
    packed = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0))
    unpack = _peer_method("flux/pipeline_flux.py", "FluxPipeline", "_unpack_latents")
    pack = _peer_method("flux/pipeline_flux.py", "FluxPipeline", "_pack_latents")
    lat = unpack(packed, 4, 6, 1)  # height, width in pixels of a VAE that does not downsample
    with torch.no_grad():
        want = vae.decode(lat / 0.3611 + 0.1159).sample
    assert want.shape == (2, 1, 4, 6)
    torch.testing.assert_close(m.decode(packed), want)
    images = torch.randn(2, 1, 4, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = (vae.encode(images).latent_dist.mode() - 0.1159) * 0.3611
    torch.testing.assert_close(m.encode(images), pack(z, 2, 4, 4, 6))
    torch.testing.assert_close(m.decode(m.encode(images)), m.decode(pack(z, 2, 4, 4, 6)))
    # the position table gives the shape of a sample: n= alone draws the pipeline's packed noise
    text = {"encoder_hidden_states": torch.randn(2, 3, 16), "pooled_projections": torch.randn(2, 8)}
    x = fs.sample(m.field(), "euler", nfe=2, n=2, seed=0, cond=text)
    assert x.shape == (2, 6, 16) and m.decode(x).shape == (2, 1, 4, 6)
    z0 = initial_noise(m.field(), 0, 0, 2, (6, 16))  # the noise of sample(seed=0), drawn as Flux's own shape
    torch.testing.assert_close(x, fs.sample(m.field(), "euler", nfe=2, x_init=z0, cond=text))
    # without the grid, and with tokens that do not fill it: refused by name
    bare = fs.models.from_diffusers(net, FlowMatchEulerDiscreteScheduler(), vae=vae)
    with pytest.raises(ValueError, match="decode: packed latents .* img_ids="):
        bare.decode(packed)
    with pytest.raises(ValueError, match=r"latents: expected packed latents \(batch, 2·3 tokens"):
        m.decode(packed[:, :4])


def test_qwen_image_latents_decode_and_encode_as_its_pipeline():
    """QwenImagePipeline: tokens of 2 × 2 patches on the grid of img_shapes, unpacked to one frame of its
    video VAE, un-normalised per channel (· std + mean) and decoded; the frame comes back as an image."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0]).eval()
    net = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                      attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                      axes_dims_rope=(2, 2, 4)).eval()
    shapes = [[(1, 2, 3)]]
    m = fs.models.from_diffusers(net, FlowMatchEulerDiscreteScheduler(), vae=vae, img_shapes=shapes)
    packed = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0))
    unpack = _peer_method("qwenimage/pipeline_qwenimage.py", "QwenImagePipeline", "_unpack_latents")
    lat = unpack(packed, 8, 12, 2)  # pixels of a VAE that halves: 4 × 6 latents
    mean, std = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1, 1), torch.tensor([1.5, 0.5, 2.0, 1.0])
    with torch.no_grad():  # the pipeline: latents / (1 / std) + mean, then decode()[:, :, 0]
        want = vae.decode(lat / (1.0 / std.view(1, 4, 1, 1, 1)) + mean).sample[:, :, 0]
    assert want.shape == (2, 3, 8, 12)
    torch.testing.assert_close(m.decode(packed), want)
    images = torch.rand(1, 3, 8, 12, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z = (vae.encode(images[:, :, None]).latent_dist.mode() - mean) / std.view(1, 4, 1, 1, 1)
    pack = _peer_method("qwenimage/pipeline_qwenimage.py", "QwenImagePipeline", "_pack_latents")
    torch.testing.assert_close(m.encode(images), pack(z[:, :, 0], 1, 4, 4, 6))


def test_flux2_latents_decode_through_its_vaes_batch_norm():
    """Flux2Pipeline: tokens scattered to their places by the position ids (`_unpack_latents_with_ids`),
    the patches un-normalised by the VAE's batch norm (· √(running var + eps) + running mean), then
    unpatchified and decoded; its image latents are patchified, normalised and packed the other way."""
    from diffusers import AutoencoderKLFlux2
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",),
                             up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                             latent_channels=4, norm_num_groups=8).eval()
    with torch.no_grad():
        vae.bn.running_mean.normal_()
        vae.bn.running_var.uniform_(0.5, 2.0)
    src = "flux2/pipeline_flux2.py"
    ids = peer_function(src, "_prepare_latent_ids", "Flux2Pipeline")(torch.zeros(2, 16, 2, 3))  # (2, 6, 4)
    shuffled = ids[:, torch.tensor([3, 0, 5, 1, 4, 2])]  # tokens in any order: each goes where its id says
    packed = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0))
    unpack = peer_function(src, "_unpack_latents_with_ids", "Flux2Pipeline")
    unpatchify = peer_function(src, "_unpatchify_latents", "Flux2Pipeline")
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    images = torch.randn(2, 1, 4, 6, generator=torch.Generator().manual_seed(1))
    for table in (ids, shuffled):
        m = fs.models.from_diffusers(_flux(), FlowMatchEulerDiscreteScheduler(), vae=vae, img_ids=table)
        with torch.no_grad():
            want = vae.decode(unpatchify(unpack(packed, table) * std + mean)).sample
        torch.testing.assert_close(m.decode(packed), want)
        # encode: the pipeline's image latents, patchified, normalised, one token per id
        with torch.no_grad():
            z = vae.encode(images).latent_dist.mode()
        patches = (peer_function(src, "_patchify_latents", "Flux2Pipeline")(z) - mean) / std
        got = m.encode(images)
        torch.testing.assert_close(unpack(got, table), patches)
        torch.testing.assert_close(m.decode(got), vae.decode(z).sample, rtol=1e-4, atol=1e-5)


def test_latent_masks_as_the_inpaint_pipelines_make_them():
    """An image mask in the model's latent layout: binarised at 0.5, resized (nearest) to the latents;
    for Flux repeated over the latent channels and packed (FluxInpaintPipeline's `prepare_mask_latents`).
    Flux inpainting with it keeps the masked-out tokens of the data exactly."""
    net = _flux()
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2).eval()  # halves: 8 × 12 images, 4 × 6 latents
    img_ids, txt_ids = _flux_ids(2, 3, 3)
    m = fs.models.from_diffusers(net, FlowMatchEulerDiscreteScheduler(), vae=vae, img_ids=img_ids, txt_ids=txt_ids,
                                 guidance=torch.tensor([3.5]))
    drawn = torch.rand(2, 1, 8, 12, generator=torch.Generator().manual_seed(0))
    pack = peer_function("flux/pipeline_flux_inpaint.py", "_pack_latents", "FluxInpaintPipeline")
    binary = (drawn >= 0.5).float()
    want = pack(torch.nn.functional.interpolate(binary, size=(4, 6)).repeat(1, 4, 1, 1), 2, 4, 4, 6)
    got = m.latent_mask(drawn)
    assert got.shape == (2, 6, 16)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(m.latent_mask(drawn[0, 0]), want[:1])  # one (H, W) mask for all rows
    # an unpacked latent model: (n, 1, h, w) at its latents' size
    from test_flow_matching import _latent_pipeline
    ldm = fs.models.from_diffusers(_latent_pipeline())
    scale = 2 ** (len(ldm.vae.config.block_out_channels) - 1)  # the pipelines' vae_scale_factor
    pixels = torch.rand(1, 1, 24, 40, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ldm.latent_mask(pixels), torch.nn.functional.interpolate(
        (pixels >= 0.5).float(), size=(24 // scale, 40 // scale)))
    assert ldm.latent_mask(pixels, size=(5, 7)).shape == (1, 1, 5, 7)
    # Flux inpainting with the packed mask keeps the data's kept tokens
    text = {"encoder_hidden_states": torch.randn(2, 3, 16), "pooled_projections": torch.randn(2, 8)}
    z0 = m.encode(torch.rand(2, 1, 8, 12, generator=torch.Generator().manual_seed(3)) * 2 - 1)
    x = fs.sample(m.field(), "euler", steps=4, init=z0, mask=got, seed=0, cond=text)
    keep = got == 0
    assert keep.any() and (~keep).any()
    torch.testing.assert_close(x[keep], z0[keep])
    assert not torch.allclose(x[~keep], z0[~keep])
    with pytest.raises(ValueError, match=r"mask: expected an image mask"):
        m.latent_mask(torch.rand(2, 3, 8, 12))
