"""Training text for the built-in tokenizer.

The text is written here (not downloaded) so a tokenizer can be built offline and
byte-for-byte the same on every machine. It mixes prose, dialogue, code, numbers and
Chinese so the learned merges cover the kinds of prompts people type into a demo.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["corpus_lines"]

_PROSE = """\
The morning train was late again, so Mira walked the last two miles along the river.
A small lighthouse stood at the end of the pier, painted white with a red stripe.
Nobody in the village remembered who had planted the row of walnut trees by the school.
When the power failed, the bakery kept its ovens warm with firewood until dawn.
He wrote every letter twice: once in pencil to think, and once in ink to send.
The museum closes at six on weekdays and at four on Sundays and public holidays.
Our garden grows tomatoes, beans, peppers, and far too many zucchini every August.
She tuned the old piano by ear, one string at a time, humming the note she wanted.
Fog rolled in from the harbour and the ferry sounded its horn three times.
The committee approved the budget after a long debate about the new library roof.
Please remember to water the plants on the balcony while I am away next week.
Thunderstorms are expected this evening, with heavy rain and strong gusts of wind.
The recipe calls for two cups of flour, one egg, a pinch of salt, and warm milk.
Children raced paper boats down the gutter after the summer shower had passed.
A quiet street can tell you more about a city than its busiest square.
The astronomer counted forty-two meteors before the clouds covered the sky.
Every spring the swallows return to the barn and rebuild their nests under the eaves.
The map was wrong, but the mistake led them to a beautiful hidden lake.
Learning a language is easier when you are curious about the people who speak it.
The bridge was built in 1887 and repaired after the great flood of 1953.
If you cannot find the answer, ask a better question and try again tomorrow.
The cat ignored the expensive toy and played with the cardboard box instead.
Grandfather kept a notebook of every bird he saw, with the date and the weather.
Solar panels on the factory roof now supply almost half of its electricity.
The students measured the height of the tower using only a shadow and a stick.
Hot tea, a warm blanket, and a good book make a long winter night feel short.
The volunteers cleaned the beach and collected twelve bags of plastic waste.
Mountains look close in clear air, but the path to the summit took all day.
A good teacher explains the same idea three ways until one of them makes sense.
The orchestra rehearsed the final movement until the conductor finally smiled.
Traffic was light on the highway, so they arrived an hour earlier than planned.
Language models predict the next token from the tokens that came before it.
A transformer layer mixes information across positions with attention.
The key and value cache stores past activations so decoding does not repeat work.
Batching many requests together keeps the accelerator busy and lowers the cost.
Greedy decoding always picks the most likely token; sampling draws from the distribution.
Temperature rescales the logits, and top-p keeps the smallest set of likely tokens.
The server streams each new piece of text to the client as soon as it is ready.
Quantum computers use qubits, which can hold a mixture of zero and one at once.
The doctor advised more sleep, less coffee, and a short walk after every meal.
Rivers carry sediment to the sea, slowly building wide and fertile deltas.
The chess player sacrificed a knight to open the diagonal for her bishop.
An honest mistake, admitted early, costs less than a clever excuse.
The spacecraft sent back photographs of icy moons and dark, dusty rings.
Fresh bread, sharp cheese, and ripe pears made a simple and perfect lunch.
The engineer checked the logs, found the bug, and wrote a test so it stays fixed.
Autumn leaves covered the path in yellow, orange, and deep shades of red.
We watched the sunset from the hill and talked until the first stars appeared.
"""

_DIALOGUE = """\
What is the capital of France? The capital of France is Paris.
How many days are in a leap year? A leap year has three hundred and sixty-six days.
Can you summarise this article in one sentence? Sure, here is a short summary.
Translate "good morning" into Chinese. 早上好。
Why is the sky blue? Sunlight scatters off air molecules, and blue light scatters most.
Write a haiku about rain. Soft rain on the roof, the kettle begins to sing, puddles hold the sky.
What time is it in Tokyo? I cannot check the clock, but Tokyo is nine hours ahead of UTC.
Give me three tips for better sleep. Keep regular hours, avoid late screens, rest in the dark.
Hello! How can I help you today?
Thank you, that was very helpful.
You are a helpful assistant. Answer briefly and accurately.
Please explain recursion to a beginner. A recursive function calls itself on a smaller part.
Is it going to rain tomorrow? The forecast says there is a seventy percent chance of showers.
Tell me a joke. Why did the scarecrow win an award? Because he was outstanding in his field.
"""

_CHINESE = """\
今天天气很好，我们一起去公园散步吧。
人工智能正在改变我们工作和学习的方式。
这本书讲述了一个年轻人离开家乡、追寻梦想的故事。
请把这段文字翻译成英文，并保持原来的语气。
春天来了，山上的花都开了，空气里有淡淡的香味。
他每天早上六点起床，先跑步，然后吃早饭。
这个问题比较复杂，我们需要分步骤来解决。
语言模型根据前面的词预测下一个词。
欢迎使用本系统，如有问题请随时联系我们。
北京是中国的首都，也是一座历史悠久的城市。
学习编程最好的方法就是多写代码、多思考。
妈妈做的饺子是世界上最好吃的。
会议将在下午三点开始，请大家准时参加。
你好！有什么可以帮你的吗？
谢谢你的帮助，祝你生活愉快。
我喜欢在安静的晚上读书、喝茶、听音乐。
"""

_CODE = """\
def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

for index, value in enumerate(items):
    print(f"{index}: {value}")

class Counter:
    def __init__(self) -> None:
        self.count = 0

    def increment(self, step: int = 1) -> None:
        self.count += step

import json
with open("config.json", encoding="utf-8") as handle:
    settings = json.load(handle)

{"model": "glm-4", "messages": [{"role": "user", "content": "Hello"}], "stream": true}
SELECT name, price FROM products WHERE price > 10 ORDER BY price DESC LIMIT 5;
curl -X POST http://localhost:8000/v1/chat/completions -H "Content-Type: application/json"
git clone https://example.com/project.git && cd project && make test
const total = values.reduce((sum, x) => sum + x, 0);
"""

_WORDS = (
    "apple bright castle distant eager forest golden harbor island journey kettle lantern "
    "meadow narrow ocean pillow quiet rocket silver thunder umbrella valley window yellow "
    "zebra anchor blossom canyon dolphin ember falcon glacier horizon ivory jasmine koala "
    "lemon marble nectar orchid pebble quartz raven saffron tulip velvet willow crystal "
    "engine network signal vector matrix tensor kernel buffer thread socket packet cipher"
).split()

_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy "
    "eighty ninety hundred thousand million"
).split()


def _generated() -> Iterator[str]:
    """Deterministic combinations that widen the vocabulary beyond the hand-written text."""
    for i, word in enumerate(_WORDS):
        other = _WORDS[(i * 7 + 3) % len(_WORDS)]
        third = _WORDS[(i * 11 + 5) % len(_WORDS)]
        yield f"The {word} and the {other} met near the {third}."
        yield f"{word.capitalize()}s, {other}s and {third}s: item {i}, price ${i * 3 + 0.99:.2f}."
        yield f"{word}_{other} = {third}({i}, {i * i})"
    for i, word in enumerate(_NUMBER_WORDS):
        yield f"{word} {word.upper()} {word.capitalize()} {i} {i * 17} {i * 1013} {2**i}"
    for year in range(1990, 2031):
        day, month = year % 28 + 1, year % 12 + 1
        yield f"In {year}, on {day}/{month}/{year}, the report listed {year * 3} items."


def _filler() -> Iterator[str]:
    """Invented words, Chinese character pairs and numbers.

    The hand-written text alone runs out of merges near 3,000 tokens; this filler lets
    an 8k vocabulary fill up, so a model's ids all decode to text.
    """
    onsets = "b c d f g h j k l m n p r s t v w z br cr dr fl gr pl st tr sh ch th".split()
    vowels = "a e i o u ai ea ou".split()
    codas = ["", "n", "r", "s", "t", "l", "nd", "st"]
    syllables = [o + v + c for o in onsets for v in vowels for c in codas]
    count = len(syllables)
    # 7919 is prime, so the second syllable walks the whole list in a scrambled order.
    words = [syllables[i] + syllables[(i * 7919 + 13) % count] for i in range(count)]
    for start in range(0, count, 12):
        yield " ".join(words[start : start + 12])
    chars = sorted({c for c in _CHINESE if "\u4e00" <= c <= "\u9fff"})
    for i, char in enumerate(chars):
        yield "，".join(char + chars[(i * step + 1) % len(chars)] for step in range(1, 12))
    yield " ".join(str(i) for i in range(1000))


def corpus_lines() -> Iterator[str]:
    """Every training line, in a fixed order (the order matters for determinism)."""
    for block in (_PROSE, _DIALOGUE, _CHINESE, _CODE):
        yield from block.splitlines()
    yield from _generated()
    yield from _filler()
