"""Fixed word lists the zoo tasks draw from. Changing them changes every task; bump `TASKS_VERSION` if you do."""

from __future__ import annotations


# Short, common, lowercase English words (3–7 letters) that tokenize into one or two SmolLM2 tokens.
WORDS = (
    "apple bread chair dance eagle flame grape house island juice knife lemon mango night ocean piano queen river "
    "stone table uncle voice water yacht zebra actor beach cloud dream earth field ghost heart image jelly koala "
    "light money north olive paper quiet radio sugar tiger umbra video wheat xenon young zesty amber bench candy "
    "daisy elbow fiber giant honey ivory jolly karma lunar maple noble orbit pearl quilt robin salad toast urban "
    "vivid waltz pixel alarm brick coral denim ember frost glove hazel index joker kayak laser metal nurse otter "
    "panda rover shelf torch unity viper whale badge cabin drum fern goat harp iron jam kite lamp mint nest oak pond "
    "rose seal tent vase wolf yarn bolt cork dove fig gem hill ink jar kiwi leaf moth nut owl pig ram silk toy van "
    "web box cup dog egg fox hat ice jet key log map net pen rug sun tap wax zip"
).split()

POSITIVE_ADJECTIVES = (
    "great wonderful excellent lovely superb delightful amazing fantastic pleasant brilliant charming splendid "
    "marvelous terrific enjoyable"
).split()
NEGATIVE_ADJECTIVES = (
    "awful terrible horrible dreadful boring dull nasty poor disappointing miserable unpleasant lousy gloomy "
    "annoying mediocre"
).split()
REVIEW_NOUNS = "movie meal hotel concert book trip service song game show party lesson course flight class".split()

ANIMALS = "cat dog horse cow sheep lion tiger bear wolf fox rabbit mouse eagle owl shark whale frog snake deer".split()
VEHICLES = "car bus truck bike train plane boat ship van taxi tram scooter jeep rocket canoe tractor subway".split()
SPORT_WORDS = "goal match team coach score player league referee stadium tournament".split()
FOOD_WORDS = "recipe soup oven flavor spice dinner sauce salad dessert kitchen".split()
WEATHER_WORDS = "rain snow wind storm cloud sunshine thunder fog frost breeze".split()

NAMES = (
    "Alice Bob Carol David Emma Frank Grace Henry Irene Jack Karen Liam Maria Noah Olivia Peter Rosa Sam Tina Victor"
).split()
CITIES = "Paris Rome Tokyo Cairo Lima Oslo Madrid Berlin Dublin Vienna Athens Prague Sydney Boston Denver".split()

WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = ("January February March April May June July August September October November December").split()

ONES = "zero one two three four five six seven eight nine".split()
TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "zero ten twenty thirty forty fifty sixty seventy eighty ninety".split()

# word -> antonym (both directions are used)
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "happy": "sad",
    "up": "down",
    "open": "closed",
    "light": "dark",
    "young": "old",
    "rich": "poor",
    "early": "late",
    "strong": "weak",
    "wet": "dry",
    "full": "empty",
    "hard": "soft",
    "high": "low",
    "near": "far",
    "thick": "thin",
    "loud": "quiet",
    "clean": "dirty",
    "new": "used",
}

VOWELS = frozenset("aeiou")
