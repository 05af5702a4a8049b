"""Stand-in for the parts of ``modules/processing.py`` that scripts see: a txt2img job object and the
order in which ``process_images`` calls the always-on script hooks around extra networks.

``prepare(p)`` runs everything up to sampling (script ``process``, per batch ``before_process_batch``,
extra-network parsing and activation, prompt encoding: ``p.uc`` then ``p.c``, through the host's condition
cache, whose lists ``cached_uc``/``cached_c`` are class attributes shared by every job unless a script gives
``p`` its own); ``finish(p)`` runs ``postprocess`` and
returns the infotext. The sampler is not simulated: tests call ``sd_model.apply_model`` themselves.
"""
from __future__ import annotations

from modules import errors, extra_networks, scripts, sd_hijack


class StableDiffusionProcessingTxt2Img:
    cached_uc = [None, None]
    cached_c = [None, None]

    def __init__(self, sd_model=None, prompt="", negative_prompt="", seed=-1, steps=20, cfg_scale=7.0,
                 width=512, height=512, batch_size=1, do_not_save_grid=True, do_not_save_samples=True,
                 do_not_reload_embeddings=False, **kwargs):
        self.sd_model = sd_model
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.seed = seed
        self.steps = steps
        self.cfg_scale = cfg_scale
        self.width = width
        self.height = height
        self.batch_size = batch_size
        self.do_not_reload_embeddings = do_not_reload_embeddings
        self.extra_generation_params = {}
        self.override_settings = {}
        self.disable_extra_networks = False
        self.scripts = []
        self.script_args = []
        self.all_prompts = [prompt] * batch_size
        self.all_negative_prompts = [negative_prompt] * batch_size
        self.prompts = list(self.all_prompts)
        self.negative_prompts = list(self.all_negative_prompts)
        self.uc = None
        self.c = None
        self.extra_network_data = None


def _run_hook(script, hook, p, *args, **kwargs):
    """The host's ScriptRunner: an exception in a script's hook is reported, and generation goes on."""
    try:
        getattr(script, hook)(p, *args, **kwargs)
    except Exception:
        errors.report(f"Error running {hook}: {script.filename}", exc_info=True)


def prepare(p):
    sd_hijack.model_hijack.clear_comments()
    if not p.do_not_reload_embeddings:
        sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings()
    for script in p.scripts:
        _run_hook(script, "process", p, *p.script_args)
    p.prompts = list(p.all_prompts)
    for script in p.scripts:
        _run_hook(script, "before_process_batch", p, *p.script_args, batch_number=0, prompts=p.prompts,
                  seeds=[p.seed], subseeds=[p.seed])
    p.prompts, p.extra_network_data = extra_networks.parse_prompts(p.prompts)
    if not p.disable_extra_networks:
        extra_networks.activate(p, p.extra_network_data)
    p.negative_prompts = list(p.all_negative_prompts)
    p.uc = get_conds_with_caching(p, p.sd_model.get_learned_conditioning, p.negative_prompts, [p.cached_uc])
    p.c = get_conds_with_caching(p, p.sd_model.get_learned_conditioning, p.prompts, [p.cached_c])
    p.extra_generation_params.update(sd_hijack.model_hijack.extra_generation_params)
    return p


def get_conds_with_caching(p, function, required_prompts, caches):
    """The host's cache: the last conditioning is reused when prompts and these settings are unchanged."""
    from modules import shared

    cached_params = (required_prompts, shared.opts.CLIP_stop_at_last_layers, p.sd_model.sd_checkpoint_info,
                     p.extra_network_data, shared.opts.emphasis)
    for cache in caches:
        if cache[0] is not None and cached_params == cache[0]:
            return cache[1]
    cache = caches[0]
    cache[1] = function(required_prompts)
    cache[0] = cached_params
    return cache[1]


def finish(p, processed=None):
    for script in p.scripts:
        _run_hook(script, "postprocess", p, processed, *p.script_args)
    params = {"Steps": p.steps, "CFG scale": p.cfg_scale, "Seed": p.seed, "Size": f"{p.width}x{p.height}",
              "Model hash": getattr(p.sd_model, "sd_model_hash", None), **p.extra_generation_params}
    line = ", ".join(f"{k}: {v}" for k, v in params.items() if v is not None)
    return f"{p.all_prompts[0]}\n{line}"


def always_on_scripts():
    """One instance of each loaded AlwaysVisible script (what the txt2img tab runs)."""
    found = []
    for cls, path, _module in scripts.scripts_data:
        script = cls()
        script.filename = path
        script.is_txt2img = True
        if script.show(False) is scripts.AlwaysVisible:
            script.alwayson = True
            found.append(script)
    return found
