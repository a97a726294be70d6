"""Check a `pkt postpkt` output dir: merged/ reloads with plain transformers and generates; adapter/ loads with
plain peft on the original student and gives the merged model's logits. Usage: check_postpkt.py RUN_DIR STUDENT_DIR"""
import sys
import time

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

run, student = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
tok = AutoTokenizer.from_pretrained(f"{run}/merged")
merged = AutoModelForCausalLM.from_pretrained(f"{run}/merged", dtype=torch.float32).eval()
msgs = [{"role": "user", "content": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?"}]
ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
with torch.no_grad():
    out = merged.generate(ids, max_new_tokens=24, do_sample=False)
    lm = merged(input_ids=ids).logits
print("generated:", repr(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
del merged
base = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
peft_model = PeftModel.from_pretrained(base, f"{run}/adapter").eval()
with torch.no_grad():
    la = peft_model(input_ids=ids).logits
print("adapter r:", peft_model.peft_config["default"].r, "max |logits(adapter on student) - logits(merged)|:", (la - lm).abs().max().item())
print(f"check took {time.perf_counter() - t0:.1f} s")
