"""Stage 6's questions: a deterministic, rule-based generator of extractive Q&A pairs from the
text of a corpus, written to data/<name>/qa.jsonl. Each rule fits one kind of sentence ("X is Y"
definitions, what a function returns, versions, dates, places, births, who speaks a line, and a
copy question any sentence gives); the answer is always a span of its context. A share of the
questions is asked again of another article's context, with no answer (SQuAD 2.0's unanswerable
questions). Same text, same pairs: every choice is fixed by a hash of the question."""
import json
import re
from pathlib import Path

from spikelib.files import write_text_atomic
from spikelib.finetune_io import normalize, stable_hash

WORD = re.compile(r"\S+")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
DOTTED_NAME = re.compile(r"^(?:class )?([A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)+)$")
UNDERLINE = re.compile(r"^[*=\-~^]{3,}$")
SPEAKER = re.compile(r"^([A-Z][A-Za-z' ]{1,30}):$")
NOT_SUBJECTS = set("this it there that which he she they these those what here its one each such all both "
                   "some any none if when while since because although unless otherwise so but and or as "
                   "where whether once then".split())
DEFINITION = re.compile(r"^((?:The |An? )?[\"\w.()]+(?: [\"\w.()-]+){0,3}) (is|are|was|were) "
                        r"((?:an?|the) [^,;:()]+?)(?:[,;:(]| and | which | that |\.$|$)")
RETURNS = re.compile(r"^Returns? (.+?)\.?$")
VERSION = re.compile(r"\b(?:New|Added) in version (\d+\.\d+)")
BORN = re.compile(r"^([A-Z][\w.'-]+(?: [A-Z][\w.'-]+){0,3})\b[^.]*? was born (?:on |in )?([^,.;()]+)")
PLACE = re.compile(r"^([A-Z]\w+(?: [A-Z]\w+){0,2}) is an? (?:city|town|village|country|region|river|island) "
                   r"in ([A-Z][\w]+(?: [A-Z]\w+){0,2})")
YEAR = re.compile(r"^In (\d{3,4}), ([^.]{10,120})\.$")
NO_ANSWER = ""                     # the gold answer of an unanswerable question: <a> <eos> at once
PART_CHARS = 10_000                # a single file's text is cut into parts of about this size (documents)


def documents(text, separator):
    """A corpus's documents: its text cut at the separator. A single file has none (separator None,
    as stage 1 records it): it is cut at paragraphs into parts of about PART_CHARS characters, so that
    a no-answer question can take the context of another part, as it takes another article's."""
    if separator:
        return text.split(separator)
    parts, part = [], ""
    for para in text.split("\n\n"):
        part = f"{part}\n\n{para}" if part else para
        if len(part) >= PART_CHARS:
            parts.append(part)
            part = ""
    return parts + [part] if part else parts


def sentences(paragraph):
    """A paragraph's sentences, lines joined: a sentence ends at . ! ? before a capital."""
    return [s.strip() for s in SENTENCE_END.split(" ".join(paragraph.split())) if s.strip()]


def short_span(text, max_words=8):
    """text if it has 1..max_words words (answers are short so exact match is meaningful)."""
    text = text.strip().rstrip(".")
    if re.search(r"\b(?:e\.g|i\.e|etc)\b", text):      # a sentence split at an abbreviation
        return None
    return text if 1 <= len(WORD.findall(text)) <= max_words else None


def sections(doc):
    """Paragraphs of a document with the title they sit under: (title, paragraph, starts_with_title).

    A title is the document's first line, a heading (a line over *** / === / ---), or the dotted
    name that opens a docstring in the builtin corpus ("json.dumps" then its docstring).
    """
    title = doc.strip().split("\n", 1)[0].strip()
    out = []
    for para in doc.split("\n\n"):
        lines = [ln.rstrip() for ln in para.strip().split("\n") if ln.strip()]
        if len(lines) >= 2 and UNDERLINE.match(lines[1].strip()):
            title, lines = lines[0].strip(), lines[2:]
        starts = bool(lines) and bool(DOTTED_NAME.match(lines[0].strip()))
        if starts:
            title = DOTTED_NAME.match(lines[0].strip()).group(1)
        if lines:
            out.append((title, "\n".join(lines), starts))
    return out


def body_sentences(para, starts_with_title):
    """The sentences of a paragraph below its title (the title is not a sentence)."""
    return sentences(para.partition("\n")[2] if starts_with_title else para)


def questions_from_paragraph(title, para, starts_with_title):
    """(kind, question, answer, context) for every sentence a rule fits; the answer is a span of
    the context, and the context is a short piece of corpus text."""
    out = []
    sents = body_sentences(para, starts_with_title)
    if starts_with_title and sents:
        m = RETURNS.match(sents[0])
        returns = short_span(m.group(1)) if m else None
        if returns:
            out.append(("returns", f"What does {title} return?", returns, f"{title}\n{sents[0]}"))
    for s in sents:
        if len(s) > 300:
            continue
        m = DEFINITION.match(s)
        if m and not NOT_SUBJECTS & {m.group(1).split()[0].lower(), m.group(1).lower().removeprefix("the ")}:
            ans = short_span(m.group(3))
            subject = m.group(1)
            if subject.startswith(("The ", "A ")):
                subject = subject[0].lower() + subject[1:]
            if ans:
                out.append(("definition", f"What {m.group(2)} {subject}?", ans, s))
        m = VERSION.search(s)
        if m and title and len(title) <= 60:
            out.append(("version", f"In which version was {title} added?", m.group(1), f"{title}\n{s}"))
        m = BORN.match(s)
        if m and short_span(m.group(2), 6):
            word = "When" if re.search(r"\d", m.group(2)) else "Where"
            out.append(("person", f"{word} was {m.group(1)} born?", short_span(m.group(2), 6), s))
        m = PLACE.match(s)
        if m:
            out.append(("place", f"Where is {m.group(1)}?", m.group(2), s))
        m = YEAR.match(s)
        if m:
            out.append(("date", f"In which year: {m.group(2)}?", m.group(1), s))
        out += next_words_question(s)
    return out


def next_words_question(sentence, k=0):
    """A copy question any text gives: 'What follows "three words"?' -> the next two words. The
    place in the sentence is fixed by its hash (k != 0, a number or a string: another place, by the
    hash of k too); the cue must occur once, so the answer is one span."""
    words = sentence.split()
    if not 8 <= len(words) <= 40:
        return []
    i = int(stable_hash(("next:" if k == 0 else f"next{k}:") + sentence) * (len(words) - 4))
    cue, answer = " ".join(words[i:i + 3]), " ".join(words[i + 3:i + 5]).rstrip(".,;:!?")
    if sentence.count(cue) != 1 or not re.search(r"\w", answer) or '"' in cue:
        return []
    return [("next", f'What follows "{cue}"?', answer, sentence)]


def widen(core, flat, limit, key):
    """core with the document's text (whitespace collapsed, words whole) around it up to ~limit
    characters; the share before it is fixed by key's hash, so the answer can be anywhere."""
    at = flat.find(" ".join(core.split()))
    room = limit - len(core)
    if at < 0 or room <= 0:
        return core
    lo = max(0, at - int(room * stable_hash("where:" + key)))
    hi = at + len(" ".join(core.split())) + room - (at - lo)
    before, after = flat[lo:at], flat[at + len(" ".join(core.split())):hi]
    before = before.split(" ", 1)[1] if lo > 0 and " " in before else ("" if lo > 0 else before)
    after = after.rsplit(" ", 1)[0] if hi < len(flat) and " " in after else ("" if hi < len(flat) else after)
    return " ".join(x for x in (before.strip(), core, after.strip()) if x)


def speaker_questions(doc, max_chars=300):
    """Plays (TinyShakespeare): "Who says: <first line of a speech>?" -> the speaker's name, with
    the previous speech and this one as context, so two names compete and the answer is a span."""
    speeches = []
    for para in doc.split("\n\n"):
        lines = para.strip().split("\n")
        m = SPEAKER.match(lines[0].strip())
        if m and len(lines) >= 2:
            speeches.append((m.group(1), lines[1].strip(), para.strip()))
    out = []
    for (prev_name, _, prev), (name, first, speech) in zip(speeches, speeches[1:]):
        if prev_name == name or len(first) < 12 or len(prev) + len(speech) > max_chars:
            continue
        out.append(("speaker", f"Who says: {first.rstrip('.,;:!?-')}?", name, prev + "\n\n" + speech))
    return out


def generate_qa(text, separator="\n\n\n", category="", max_questions=20000, test_fraction=0.1,
                context_chars=0, no_answer=0.0, copies=1):
    """Deterministic extractive Q&A pairs from a corpus: a list of dicts with question, answer,
    context, split ("train"/"test", fixed by the question's hash), kind, article, section, category.
    A question asked twice keeps its first answer, so every question has one answer. context_chars
    > 0 widens each context with the text around it (widen); a no_answer share of the questions is
    asked again of another document's context, with the answer NO_ANSWER (kind "none"). copies > 1
    adds training-only copy questions (copy_drills); the held-out pairs stay the same."""
    docs = documents(text, separator)
    pairs, seen, held = rule_pairs(docs, category, test_fraction, context_chars)
    if len(pairs) > max_questions:       # a fixed subset spread over the corpus, kept in corpus order
        keep = set(sorted(range(len(pairs)), key=lambda i: stable_hash(pairs[i]["question"]))[:max_questions])
        pairs = [p for i, p in enumerate(pairs) if i in keep]
    pairs += unanswerable(pairs, no_answer)
    for p in pairs:
        p["split"] = "test" if stable_hash("split:" + p["question"]) < test_fraction else "train"
    drills = copy_drills(docs, seen, held, copies, category, context_chars)
    drills += unanswerable(drills, no_answer)
    return pairs + [dict(p, split="train") for p in drills]


def rule_pairs(docs, category, test_fraction, context_chars):
    """(the rules' pairs in corpus order, without split; the questions asked; the sentences that
    hold a held-out question, which copy drills never use)."""
    pairs, seen, held = [], set(), set()
    for d, doc in enumerate(docs):
        where = document_place(doc, category)
        found = [(k, q, a, c, f"d{d}.s0") for k, q, a, c in speaker_questions(doc)]
        for s, (title, para, starts) in enumerate(sections(doc)):
            asked = questions_from_paragraph(title, para, starts)
            found += [(k, q, a, c, f"d{d}.s{s}") for k, q, a, c in asked]
        for kind, q, a, c, sec in found:
            if q in seen or a not in c:
                continue
            seen.add(q)
            if stable_hash("split:" + q) < test_fraction:      # its sentences get no copy drills
                held.update(sentence for line in c.split("\n") for sentence in sentences(line))
            pairs.append(make_pair(where, kind, q, a, c, sec, context_chars))
    return pairs, seen, held


def document_place(doc, category=""):
    """(its text with whitespace collapsed, for widen; its article title; its category), once per document."""
    article = doc.strip().split("\n", 1)[0].strip()[:80]
    category = category or ("help topic" if article.startswith("Python help topic") else
                            "module" if article.startswith("Module ") else "")
    return " ".join(doc.split()), article, category


def make_pair(where, kind, question, answer, context, section, context_chars=0, key=""):
    """One pair's dict (without its split), the context widened within its document (the text's
    share before the core fixed by the hash of key, the question unless given)."""
    flat, article, category = where
    if context_chars:
        context = widen(context, flat, context_chars, key or question)
    return {"question": question, "answer": answer, "context": context, "kind": kind, "article": article,
            "section": section, "category": category}


def copy_drills(docs, seen, held, copies, category="", context_chars=0):
    """'What follows' questions at copies - 1 more places of every sentence that holds no held-out
    question: many more pairs to learn copying from (one per sentence gives ~9,000 on the builtin
    corpus, and a model that sees them for many epochs learns them by heart instead), while no
    held-out question, answer or cue sentence is ever trained on."""
    out = []
    for where, section, sentence in drill_sentences(docs, held, category):
        for kind, q, a, c in other_places(sentence, copies):
            if q not in seen:
                seen.add(q)
                out.append(make_pair(where, kind, q, a, c, section, context_chars))
    return out


def drill_sentences(docs, held, category=""):
    """(document place, section, sentence) for every body sentence of at most 300 characters that
    holds no held-out question: the sentences copy drills may ask about."""
    for d, doc in enumerate(docs):
        where = document_place(doc, category)
        for s, (_, para, starts) in enumerate(sections(doc)):
            for sentence in body_sentences(para, starts):
                if len(sentence) <= 300 and sentence not in held:
                    yield where, f"d{d}.s{s}", sentence


class FreshDrills:
    """'What follows' questions drawn anew for every batch: a random sentence of drill_sentences,
    a random place in it, a random share of the widened context before it. About 50 places x the
    context's many offsets per sentence: a model cannot learn them by heart, only learn to copy.
    A no_answer share is asked of another article's context instead (answer NO_ANSWER), as in
    generate_qa. The held-out set is generate_qa's with the same text and test_fraction; none of
    its sentences is ever asked about."""

    def __init__(self, text, separator="\n\n\n", test_fraction=0.1, context_chars=0, no_answer=0.0,
                 category=""):
        docs = documents(text, separator)
        _, _, held = rule_pairs(docs, category, test_fraction, 0)
        self.context_chars, self.no_answer = context_chars, no_answer
        sources = drill_sentences(docs, held, category)
        self.sources = [src for src in sources if 8 <= len(src[2].split()) <= 40]
        if len({where[1] for where, _, _ in self.sources}) < 2:
            raise ValueError("the corpus has no sentences of 8 to 40 words outside the held-out set "
                             "in two articles or more to draw copy questions from")

    def draw(self, rng):
        """One fresh pair (split "train"); rng is a numpy Generator, so a seed and step fix it."""
        pair = self.copy_question(rng)
        if rng.random() >= self.no_answer:
            return pair
        for _ in range(20):              # the context of a place in another article, without the answer
            other = self.copy_question(rng)
            elsewhere = other["article"] != pair["article"]
            if elsewhere and normalize(pair["answer"]) not in normalize(other["context"]):
                return dict(pair, answer=NO_ANSWER, context=other["context"], kind="none", is_impossible=True)
        return pair

    def copy_question(self, rng):
        """A 'What follows' pair at a random place of a random sentence, its context widened."""
        for _ in range(1000):            # a place whose cue occurs twice in its sentence is redrawn
            where, section, sentence = self.sources[int(rng.integers(len(self.sources)))]
            key = f"fresh{int(rng.integers(1 << 62))}"
            found = next_words_question(sentence, key)
            if found:
                kind, q, a, c = found[0]
                return dict(make_pair(where, kind, q, a, c, section, self.context_chars, key), split="train")
        raise ValueError("1000 random places of the corpus gave no copy question (each cue must occur "
                         "once in its sentence, without quotes, before a word)")


def other_places(sentence, copies):
    """The copy questions at places 1 .. copies - 1 of a sentence (place 0 is the rule's own)."""
    return [found for k in range(1, copies) for found in next_words_question(sentence, k)]


def unanswerable(pairs, share):
    """For a share of the questions (fixed by hash), the same question with the context of a pair
    from another article that does not hold the answer: answer NO_ANSWER."""
    out = []
    for i, p in enumerate(pairs):
        if stable_hash("none:" + p["question"]) >= share:
            continue
        for step in range(1, 20):        # the first other-article context without the answer
            j = (i + int(stable_hash(f"other{step}:" + p["question"]) * len(pairs))) % len(pairs)
            other = pairs[j]["context"]
            if pairs[j]["article"] != p["article"] and normalize(p["answer"]) not in normalize(other):
                out.append(dict(p, answer=NO_ANSWER, context=other, kind="none", is_impossible=True))
                break
    return out


def write_qa(data_dir, cfg, model_context):
    """data/<name>/qa.jsonl from the dataset's train.txt (rewritten each time: it is cheap and fixed)."""
    text, separator = corpus_text(data_dir)
    pairs = generate_qa(text, separator, "", cfg.max_questions, cfg.test_fraction,
                        cfg.context_chars or 2 * model_context, cfg.no_answer, cfg.copy_questions)
    lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    return write_text_atomic(Path(data_dir) / "qa.jsonl", lines), pairs


def fresh_drills(data_dir, cfg, model_context):
    """The FreshDrills of the dataset's train.txt, held out as write_qa holds out."""
    text, separator = corpus_text(data_dir)
    chars = cfg.context_chars or 2 * model_context
    return FreshDrills(text, separator, cfg.test_fraction, chars, cfg.no_answer)


def corpus_text(data_dir):
    """(the dataset's train.txt, the separator of its documents from meta.json: None for a single file)."""
    data_dir = Path(data_dir)
    meta = json.loads((data_dir / "meta.json").read_text()) if (data_dir / "meta.json").exists() else {}
    return (data_dir / "train.txt").read_text(encoding="utf-8"), meta.get("doc_separator", "\n\n\n")
