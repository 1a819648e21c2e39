"""Tiny tokenizers, targets and conversations for the training tests (CPU-cheap, offline)."""
import random

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# The chat template of Meta-Llama-3-8B-Instruct.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this from or "
         "had by word but what some we can out other were all there when up use your how said an each she "
         "which do their time if will way about many then them write would like so these her long make thing "
         "see him two has look more day could go come did number sound no most people my over know water than "
         "call first who may down side been now find any new work part take get place made live where after "
         "back little only round man year came show every good me give our under name very through just form "
         "sentence great think say help low line differ turn cause much mean before move right boy old too same "
         "tell does set three want air well also play small end put home read hand port large spell add even "
         "land here must big high such follow act why ask men change went light kind off need house picture try "
         "us again animal point mother world near build self earth father head stand own page should country "
         "found answer school grow study still learn plant cover food sun four between state keep eye never last "
         "let thought city tree cross farm hard start might story saw far sea draw left late run while press "
         "close night real life few north open seem together next white children begin got walk example ease "
         "paper group always music those both mark often letter until mile river car feet care second book carry "
         "took science eat room friend began idea fish mountain stop once base hear horse cut sure watch color "
         "face wood main enough plain girl usual young ready above ever red list though feel talk bird soon body "
         "dog family direct pose leave song measure door product black short numeral class wind question happen "
         "complete ship area half rock order fire south problem piece told knew pass since top whole king space "
         "heard best hour better true during hundred five remember step early hold west ground interest reach "
         "fast verb sing listen six table travel less morning ten simple several vowel toward war lay against "
         "pattern slow center love person money serve appear road map rain rule govern pull cold notice voice "
         "unit power town fine certain fly fall lead cry dark machine note wait plan figure star box noun field "
         "rest correct able pound done beauty drive stood contain front teach week final gave green oh quick "
         "develop ocean warm free minute strong special mind behind clear tail produce fact street inch multiply "
         "nothing course stay wheel full force blue object decide surface deep moon island foot system busy test "
         "record boat common gold possible plane stead dry wonder laugh thousand ago ran check game shape equate "
         "hot miss brought heat snow tire bring yes distant fill east paint language among").split()

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<pad>"]


def sentence(rng: random.Random, n_words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(n_words))
    return text[0].upper() + text[1:] + rng.choice([".", "!", "?", ".\n\nAlso, 2 + 3 = 5."])


def make_records(n: int, seed: int = 0, max_words: int = 12):
    """ShareGPT-style records, including the irregular shapes the loader must handle."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        turns = []
        if i % 7 == 3:
            turns.append({"from": "gpt", "value": "A leading assistant turn that must be dropped."})
        if i % 11 == 5:
            turns.append({"from": "system", "value": "*shared from somewhere*"})
        for _ in range(rng.randint(1, 3)):
            turns.append({"from": "human", "value": sentence(rng, rng.randint(3, max_words))})
            turns.append({"from": "gpt", "value": sentence(rng, rng.randint(3, max_words))})
        if i % 5 == 2:
            turns.append({"from": "human", "value": "An unanswered question?"})
        records.append({"id": f"rec{i}", "conversations": turns})
    return records


_TOKENIZERS = {}


def tiny_tokenizer(template: str = "chatml", vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on WORDS (fast, with offsets) carrying the given chat template."""
    key = (template, vocab_size)
    if key in _TOKENIZERS:
        return _TOKENIZERS[key]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    rng = random.Random(0)
    tk.train_from_iterator([sentence(rng, 20) for _ in range(200)], trainer)
    if template == "chatml":
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<pad>",
                                      bos_token="<|im_start|>")
        tok.chat_template = CHATML_TEMPLATE
    elif template == "llama3":
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|eot_id|>", pad_token="<pad>",
                                      bos_token="<|begin_of_text|>")
        tok.chat_template = LLAMA3_TEMPLATE
    else:
        raise ValueError(template)
    _TOKENIZERS[key] = tok
    return tok


def tiny_target(template: str = "chatml", seed: int = 0, hidden: int = 64, layers: int = 2, head_scale: float = 1.0):
    """A random 2-layer Llama with the tiny tokenizer, wrapped as a hass_ext.Target.

    head_scale multiplies the lm_head (a random head gives near-uniform distributions; larger is peakier)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hass_ext.target import Target

    tok = tiny_tokenizer(template)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return Target(model, tok, f"tiny-llama-{template}")
