"""Hand-written material for scripts/make_bundled_data.py (definitions, facts, tips, explanations, code)."""

GLOSSARY = [
    ("photosynthesis", "Photosynthesis is the process plants, algae and some bacteria use to turn light into "
     "chemical energy. Using sunlight, they combine carbon dioxide from the air with water to make glucose, and "
     "release oxygen as a by-product."),
    ("inflation", "Inflation is the general rise in prices over time, which means each unit of money buys a "
     "little less than before. Central banks usually aim for low, steady inflation of around two percent a year."),
    ("a compiler", "A compiler is a program that translates source code written in a high-level language, such as "
     "C or Rust, into machine code or another lower-level form that a computer can run directly."),
    ("an API", "An API, or application programming interface, is a defined set of rules that lets one piece of "
     "software request data or services from another. For example, a weather app calls a weather service's API "
     "to get the forecast."),
    ("opportunity cost", "Opportunity cost is the value of the best alternative you give up when you make a "
     "choice. If you spend Saturday working instead of hiking, the hike you missed is the opportunity cost."),
    ("osmosis", "Osmosis is the movement of water across a semi-permeable membrane from a region with fewer "
     "dissolved particles to one with more, until the concentrations on both sides even out."),
    ("a haiku", "A haiku is a short Japanese poem of three lines with five, seven and five syllables. It "
     "traditionally captures a single moment in nature, often with a hint of the season."),
    ("machine learning", "Machine learning is a branch of artificial intelligence in which computers learn "
     "patterns from examples instead of following hand-written rules. A spam filter, for instance, learns what "
     "spam looks like from thousands of labelled emails."),
    ("a recession", "A recession is a significant decline in economic activity that lasts for months, usually "
     "seen in falling output, rising unemployment and weaker spending. A common rule of thumb is two consecutive "
     "quarters of shrinking GDP."),
    ("the greenhouse effect", "The greenhouse effect is the warming of a planet's surface by gases such as carbon "
     "dioxide, methane and water vapour, which let sunlight in but trap part of the heat radiated back out."),
    ("a sonnet", "A sonnet is a fourteen-line poem with a fixed rhyme scheme, usually written in iambic "
     "pentameter. Shakespeare's sonnets end with a rhyming couplet that often turns or resolves the argument."),
    ("recursion", "Recursion is when a function solves a problem by calling itself on smaller versions of the "
     "same problem, until it reaches a simple base case it can answer directly. Computing a factorial as "
     "n times factorial(n - 1) is a classic example."),
    ("a blockchain", "A blockchain is a shared ledger made of blocks of records, where each block contains a "
     "cryptographic hash of the one before it. Because changing an old block would break every later hash, the "
     "history is very hard to alter."),
    ("biodiversity", "Biodiversity is the variety of life in a place, from genes and species to whole "
     "ecosystems. High biodiversity makes ecosystems more resilient to disease, climate shifts and other shocks."),
    ("compound interest", "Compound interest is interest calculated on both the original amount and the interest "
     "already added. Over long periods it makes savings grow much faster than simple interest does."),
    ("a metaphor", "A metaphor is a figure of speech that describes something by saying it is something else, "
     "such as \"time is a thief\". Unlike a simile, it does not use \"like\" or \"as\"."),
    ("an enzyme", "An enzyme is a protein that speeds up a chemical reaction in a living thing without being used "
     "up. Amylase in saliva, for example, starts breaking starch into sugar while you chew."),
    ("supply and demand", "Supply and demand is the economic model in which the price of a good settles where the "
     "amount sellers want to sell matches the amount buyers want to buy. Scarcity pushes prices up; a glut pushes "
     "them down."),
    ("version control", "Version control is a system that records changes to files over time so you can see who "
     "changed what, go back to earlier versions, and work on separate branches. Git is the most widely used tool."),
    ("a tempo marking", "A tempo marking tells a musician how fast to play a piece. Italian terms are common: "
     "largo is very slow, andante is a walking pace, allegro is fast and presto is very fast."),
    ("erosion", "Erosion is the wearing away of rock and soil by water, wind, ice or gravity, and the transport of "
     "that material elsewhere. Over millions of years it carved features such as the Grand Canyon."),
    ("a budget deficit", "A budget deficit occurs when a government spends more than it collects in revenue in a "
     "given year. The gap is usually covered by borrowing, which adds to the national debt."),
    ("an operating system", "An operating system is the software that manages a computer's hardware and lets "
     "other programs run. It handles memory, files, processes and devices; Linux, Windows and macOS are examples."),
    ("a food chain", "A food chain shows who eats whom in an ecosystem, starting from producers such as plants and "
     "moving up through herbivores to predators. Grass, rabbit and fox form a simple one."),
    ("an offside position", "In football, a player is in an offside position if they are in the opponent's half "
     "and closer to the goal line than both the ball and the second-to-last defender when the ball is played to "
     "them."),
    ("latency", "Latency is the delay between a request and the start of its response, such as the time a network "
     "packet takes to travel to a server and back. Lower latency makes video calls and games feel more responsive."),
    ("braising", "Braising is a cooking method where food is first browned in fat and then cooked slowly in a "
     "small amount of liquid in a covered pot. It turns tough cuts of meat tender."),
    ("a hypothesis", "A hypothesis is a testable prediction about how something works, made before an experiment. "
     "For example: plants given more light will grow taller in four weeks than plants kept in shade."),
    ("gross domestic product", "Gross domestic product, or GDP, is the total value of all final goods and services "
     "produced in a country in a given period. It is the most common measure of the size of an economy."),
    ("a neuron", "A neuron is a nerve cell that carries information as electrical and chemical signals. It "
     "receives signals through its dendrites and passes them on along its axon to other cells."),
    ("encryption", "Encryption scrambles data with a key so that only someone with the right key can read it. "
     "It protects messages, passwords and card numbers as they travel across the internet."),
    ("a cover letter", "A cover letter is a one-page letter sent with a job application that explains why you are "
     "interested in the role and how your experience fits it. It complements the CV rather than repeating it."),
    ("kinetic energy", "Kinetic energy is the energy an object has because it is moving. It equals one half of "
     "the mass times the velocity squared, so doubling the speed quadruples the energy."),
    ("a watershed", "A watershed is an area of land where all the rain and melting snow drain into the same river, "
     "lake or sea. What happens anywhere upstream affects water quality downstream."),
    ("a unit test", "A unit test is a small automated test that checks one function or component in isolation, "
     "for example that add(2, 3) returns 5. Good unit tests run fast and fail with a clear message."),
    ("fermentation", "Fermentation is the process in which microorganisms such as yeast or bacteria break down "
     "sugars without oxygen, producing acids, gases or alcohol. It gives us bread, yogurt, cheese and beer."),
    ("a sprint in Scrum", "In Scrum, a sprint is a fixed period, usually one to four weeks, in which a team "
     "commits to finishing a set of work items and ends with a review of what was delivered."),
    ("plate tectonics", "Plate tectonics is the theory that Earth's outer shell is split into large plates that "
     "slowly move over the mantle. Their collisions and separations cause earthquakes, volcanoes and mountains."),
    ("diversification", "Diversification means spreading investments across different assets so that a loss in "
     "one is cushioned by the others. Holding many stocks, plus some bonds, is less risky than holding one stock."),
    ("a palindrome", "A palindrome is a word, number or phrase that reads the same backwards as forwards, such as "
     "\"level\", 12321 or \"never odd or even\" when spaces are ignored."),
    ("the water cycle", "The water cycle is the continuous movement of water on Earth: it evaporates from oceans and "
     "lakes, condenses into clouds, falls as rain or snow, and flows back through rivers and groundwater."),
    ("a cache", "A cache is a small, fast store that keeps copies of data that is used often, so later requests "
     "can be answered without going back to the slower original source."),
    ("an allele", "An allele is one of the different versions of a gene. For example, a gene for eye colour may "
     "have an allele for brown eyes and another for blue eyes."),
    ("a mortgage", "A mortgage is a loan used to buy property, in which the property itself serves as security. "
     "The borrower repays it in instalments over many years, usually fifteen to thirty."),
    ("alliteration", "Alliteration is the repetition of the same starting sound in nearby words, as in \"Peter "
     "Piper picked a peck of pickled peppers\". Poets and advertisers use it to make phrases memorable."),
    ("an ecosystem", "An ecosystem is a community of living things together with their physical environment, "
     "such as a pond with its plants, insects, fish, water and sunlight, all interacting as one system."),
    ("bandwidth", "Bandwidth is the maximum amount of data a connection can carry per second, usually measured in "
     "megabits per second. It is the width of the pipe, while latency is how long the trip takes."),
    ("a vaccine", "A vaccine is a preparation that trains the immune system to recognise a germ without causing "
     "the disease, so the body can respond quickly if it meets the real infection later."),
    ("the Pythagorean theorem", "The Pythagorean theorem says that in a right triangle the square of the longest "
     "side equals the sum of the squares of the other two: a squared plus b squared equals c squared."),
    ("a gerund", "A gerund is a verb form ending in -ing that works as a noun, as in \"Swimming is good exercise\". "
     "Here swimming is the subject of the sentence."),
    ("a dividend", "A dividend is a share of a company's profit paid out to its shareholders, usually in cash "
     "every quarter or year."),
    ("refraction", "Refraction is the bending of light as it passes from one material into another, such as from "
     "air into water. It is why a straw in a glass looks broken at the surface."),
    ("technical debt", "Technical debt is the future cost of shortcuts taken in software today. Quick fixes save "
     "time now, but the code becomes harder to change until someone pays the debt back by cleaning it up."),
    ("a marathon", "A marathon is a long-distance running race of 42.195 kilometers, or about 26.2 miles. The "
     "distance was fixed at the 1908 London Olympics."),
]

COUNTRIES = [
    ("France", "Paris", "Europe", "French", "euro", "It is famous for its cuisine, its wine regions and landmarks "
     "such as the Eiffel Tower."),
    ("Japan", "Tokyo", "Asia", "Japanese", "Japanese yen", "The country is an archipelago of thousands of islands "
     "known for its temples, trains and cherry blossoms."),
    ("Brazil", "Brasilia", "South America", "Portuguese", "Brazilian real", "Much of the Amazon rainforest lies "
     "within its borders."),
    ("Kenya", "Nairobi", "Africa", "Swahili and English", "Kenyan shilling", "Its national parks are among the best "
     "places in the world to see lions, elephants and the great migration."),
    ("Canada", "Ottawa", "North America", "English and French", "Canadian dollar", "It is the second-largest "
     "country by area, with vast forests and more lakes than any other nation."),
    ("Australia", "Canberra", "Oceania", "English", "Australian dollar", "It is home to the Great Barrier Reef and "
     "to animals found nowhere else, such as kangaroos and koalas."),
    ("Egypt", "Cairo", "Africa", "Arabic", "Egyptian pound", "The pyramids of Giza and the Nile valley draw "
     "visitors from around the world."),
    ("India", "New Delhi", "Asia", "Hindi and English", "Indian rupee", "It is the most populous country in the "
     "world and has an enormous variety of languages and cuisines."),
    ("Mexico", "Mexico City", "North America", "Spanish", "Mexican peso", "Ancient cities such as Teotihuacan and "
     "Chichen Itza show its long history."),
    ("Norway", "Oslo", "Europe", "Norwegian", "Norwegian krone", "Its coastline is cut by deep fjords, and in the "
     "far north the sun does not set in midsummer."),
    ("Argentina", "Buenos Aires", "South America", "Spanish", "Argentine peso", "It stretches from subtropical "
     "forests to the glaciers of Patagonia."),
    ("Vietnam", "Hanoi", "Asia", "Vietnamese", "Vietnamese dong", "Ha Long Bay and its limestone islands are a "
     "UNESCO World Heritage Site."),
    ("Germany", "Berlin", "Europe", "German", "euro", "It has the largest economy in Europe and a long tradition of "
     "engineering and music."),
    ("Morocco", "Rabat", "Africa", "Arabic and Berber", "Moroccan dirham", "Its old medinas, such as those of Fez "
     "and Marrakesh, are full of markets and craft workshops."),
    ("New Zealand", "Wellington", "Oceania", "English and Maori", "New Zealand dollar", "Its two main islands offer "
     "mountains, geysers and beaches within a few hours of each other."),
    ("Peru", "Lima", "South America", "Spanish and Quechua", "Peruvian sol", "The Inca citadel of Machu Picchu "
     "sits high in its Andes mountains."),
    ("South Korea", "Seoul", "Asia", "Korean", "South Korean won", "It is a world leader in electronics and known "
     "for its food, music and film."),
    ("Italy", "Rome", "Europe", "Italian", "euro", "It has more UNESCO World Heritage Sites than almost any other "
     "country."),
    ("Ghana", "Accra", "Africa", "English", "Ghanaian cedi", "It was the first country in sub-Saharan Africa to "
     "gain independence from colonial rule, in 1957."),
    ("Chile", "Santiago", "South America", "Spanish", "Chilean peso", "Its Atacama Desert is one of the driest "
     "places on Earth and a favourite spot for astronomers."),
    ("Sweden", "Stockholm", "Europe", "Swedish", "Swedish krona", "Stockholm is built on fourteen islands linked "
     "by bridges."),
    ("Thailand", "Bangkok", "Asia", "Thai", "Thai baht", "It is known for its Buddhist temples, street food and "
     "tropical islands."),
    ("Portugal", "Lisbon", "Europe", "Portuguese", "euro", "Its sailors led many of the great ocean voyages of the "
     "fifteenth and sixteenth centuries."),
    ("Nigeria", "Abuja", "Africa", "English", "Nigerian naira", "It is Africa's most populous country and has a "
     "booming film industry nicknamed Nollywood."),
    ("Iceland", "Reykjavik", "Europe", "Icelandic", "Icelandic krona", "Volcanoes, glaciers and hot springs shape "
     "its landscape."),
    ("Colombia", "Bogota", "South America", "Spanish", "Colombian peso", "It is one of the world's leading coffee "
     "producers and one of its most biodiverse countries."),
    ("Indonesia", "Jakarta", "Asia", "Indonesian", "Indonesian rupiah", "It spreads across more than seventeen "
     "thousand islands."),
    ("Greece", "Athens", "Europe", "Greek", "euro", "Ancient Greece gave the world democracy, the Olympic Games "
     "and much of Western philosophy."),
    ("Ethiopia", "Addis Ababa", "Africa", "Amharic", "Ethiopian birr", "It is often called the birthplace of "
     "coffee."),
    ("Turkey", "Ankara", "Europe and Asia", "Turkish", "Turkish lira", "Istanbul, its largest city, straddles the "
     "Bosphorus between two continents."),
]

PLANETS = [
    ("Mercury", "Mercury is the smallest planet and the closest to the Sun. It has almost no atmosphere, so its "
     "surface swings from about 430 degrees Celsius by day to minus 180 at night, and a year there lasts only "
     "88 Earth days."),
    ("Venus", "Venus is about the same size as Earth but wrapped in thick clouds of carbon dioxide and sulfuric "
     "acid. The runaway greenhouse effect makes it the hottest planet, hotter even than Mercury."),
    ("Mars", "Mars is the red planet: iron oxide dust gives its surface that colour. It has the tallest volcano "
     "in the solar system, Olympus Mons, and evidence that liquid water once flowed there."),
    ("Jupiter", "Jupiter is the largest planet, a gas giant more than eleven times wider than Earth. Its Great "
     "Red Spot is a storm bigger than our planet that has raged for centuries, and it has dozens of moons."),
    ("Saturn", "Saturn is a gas giant best known for its bright rings of ice and rock. It is so light for its "
     "size that it would float in a bathtub large enough to hold it."),
    ("Uranus", "Uranus is an ice giant that rotates on its side, probably because of a huge collision long ago. "
     "Methane in its atmosphere gives it a pale blue-green colour."),
    ("Neptune", "Neptune is the farthest planet from the Sun and has the strongest winds in the solar system, "
     "reaching over 2,000 kilometers per hour. It was found in 1846 by mathematical prediction before anyone saw it."),
    ("Earth", "Earth is the third planet from the Sun and the only place known to host life. Liquid water covers "
     "about 71 percent of its surface, and its magnetic field shields it from the solar wind."),
]

ANIMALS = {"dolphin": "mammal", "penguin": "bird", "crocodile": "reptile", "frog": "amphibian", "salmon": "fish",
           "bat": "mammal", "ostrich": "bird", "gecko": "reptile", "salamander": "amphibian", "shark": "fish",
           "whale": "mammal", "eagle": "bird", "tortoise": "reptile", "newt": "amphibian", "tuna": "fish",
           "kangaroo": "mammal", "owl": "bird", "iguana": "reptile", "toad": "amphibian", "cod": "fish",
           "platypus": "mammal", "parrot": "bird", "cobra": "reptile", "axolotl": "amphibian", "seahorse": "fish"}

TIPS = [
    ("sleep better", ["Go to bed and wake up at the same time every day, even on weekends.",
                      "Keep your bedroom dark, quiet and slightly cool.",
                      "Avoid caffeine after early afternoon.",
                      "Put screens away for the last half hour before bed.",
                      "Get some daylight and exercise during the day."]),
    ("save money on groceries", ["Plan the week's meals and shop with a list.",
                                 "Compare the unit price rather than the package price.",
                                 "Buy staples such as rice, oats and beans in bulk.",
                                 "Cook larger batches and freeze portions for later.",
                                 "Never shop when you are hungry."]),
    ("study more effectively", ["Test yourself instead of rereading your notes.",
                                "Spread your study sessions over several days rather than cramming.",
                                "Work in focused blocks of 25 to 50 minutes with short breaks.",
                                "Explain the material out loud as if teaching someone else.",
                                "Keep your phone in another room while you study."]),
    ("start running", ["Begin with run-walk intervals, such as one minute running and two walking.",
                       "Run at a pace where you can still hold a conversation.",
                       "Increase your weekly distance by no more than about ten percent.",
                       "Get a pair of shoes fitted at a running shop.",
                       "Schedule rest days so your body can adapt."]),
    ("reduce stress at work", ["Write a short to-do list each morning and pick the three most important tasks.",
                               "Take a real lunch break away from your desk.",
                               "Turn off notifications for email while you focus.",
                               "Say no, politely, to requests that do not fit your priorities.",
                               "Take a short walk when you feel tension building."]),
    ("learn a new language", ["Practice a little every day rather than a lot once a week.",
                              "Learn the most common few hundred words first.",
                              "Listen to podcasts or shows in the language, with subtitles at first.",
                              "Find a conversation partner and speak from the first week.",
                              "Keep a notebook of useful phrases you hear."]),
    ("write clearer emails", ["Put the request or main point in the first two sentences.",
                              "Use a subject line that says what the email is about.",
                              "Keep paragraphs to two or three sentences.",
                              "Use bullet points for lists of questions or steps.",
                              "Reread the email once before sending it."]),
    ("keep houseplants alive", ["Check the soil with your finger and water only when the top few centimeters are "
                                "dry.", "Put each plant in light that matches its needs.",
                                "Use pots with drainage holes.",
                                "Wipe dust off the leaves now and then.",
                                "Feed them lightly during spring and summer only."]),
    ("get better at public speaking", ["Practice the talk out loud several times, not just in your head.",
                                       "Open with a story or a question instead of an agenda slide.",
                                       "Slow down and pause after key points.",
                                       "Look at individual people in the audience for a sentence or two.",
                                       "Record yourself once and watch it back."]),
    ("cook rice perfectly", ["Rinse the rice until the water runs mostly clear.",
                             "Use about one and a half cups of water per cup of long-grain white rice.",
                             "Bring it to a boil, then cover and simmer on the lowest heat.",
                             "Do not lift the lid while it cooks.",
                             "Let it rest covered for ten minutes before fluffing with a fork."]),
    ("be more productive in the morning", ["Prepare your clothes and bag the night before.",
                                           "Drink a glass of water as soon as you wake up.",
                                           "Do the hardest task first, before checking messages.",
                                           "Keep the same wake-up time every day."]),
    ("make a small apartment feel bigger", ["Use mirrors to reflect light across the room.",
                                            "Choose furniture with legs so you can see the floor beneath it.",
                                            "Keep surfaces clear and store things in closed cabinets.",
                                            "Paint the walls a light colour.",
                                            "Use vertical shelving to free up floor space."]),
    ("prepare for a job interview", ["Research the company's products and recent news.",
                                     "Prepare short stories that show your skills, using situation, task, action "
                                     "and result.", "Have two or three questions ready to ask the interviewer.",
                                     "Plan your route and arrive ten minutes early.",
                                     "Send a short thank-you note afterwards."]),
    ("drink more water", ["Carry a refillable bottle with you.",
                          "Drink a glass with every meal.",
                          "Add a slice of lemon or cucumber if plain water bores you.",
                          "Set a reminder on your phone for the afternoon slump."]),
    ("take better photos with a phone", ["Clean the lens before shooting.",
                                         "Turn on the grid and place your subject on the thirds lines.",
                                         "Use natural light and avoid the flash where possible.",
                                         "Tap to focus and slide to adjust the exposure.",
                                         "Get closer instead of using digital zoom."]),
    ("reduce household waste", ["Bring reusable bags and containers when you shop.",
                                "Compost fruit and vegetable scraps.",
                                "Buy loose produce instead of pre-packed.",
                                "Repair things before replacing them.",
                                "Plan meals so less food goes off in the fridge."]),
]

EMAILS = [
    ("my manager", "Sarah", "asking to move our one-on-one meeting from Tuesday to Thursday",
     ("Moving our one-on-one to Thursday?", "Would it be possible to move our one-on-one from Tuesday to Thursday "
      "at the same time? I have a customer workshop on Tuesday morning that ran over its planned slot. If Thursday "
      "does not work for you, I am happy to pick another time."), "Daniel"),
    ("a colleague", "Ahmed", "thanking him for helping with the quarterly report",
     ("Thank you for your help with the report", "Thank you for stepping in on the quarterly report last week. "
      "Your analysis of the regional numbers made the summary much clearer, and the leadership team noticed. "
      "I owe you a coffee."), "Lena"),
    ("my landlord", "Mr. Patel", "reporting that the kitchen tap is leaking",
     ("Leaking kitchen tap in flat 4B", "The kitchen tap in flat 4B has started to leak steadily, even when it is "
      "fully closed. Could you arrange for a plumber to take a look? I am at home most evenings after six, or the "
      "plumber is welcome to use the spare key."), "Maria Lopez"),
    ("a professor", "Professor Chen", "asking for an extension on the term paper",
     ("Request for a short extension on the term paper", "I am writing to ask whether I could have a three-day "
      "extension on the term paper due Friday. I was ill for most of last week and have a doctor's note. The "
      "research is done and I am now writing the final sections."), "Tom Becker"),
    ("a customer", "Ms. Okafor", "apologising for a delayed delivery",
     ("Your order is on its way", "I am sorry that your order did not arrive on the promised date. A problem at our "
      "warehouse delayed several shipments this week. Your package left yesterday and should reach you by "
      "Wednesday, and we have refunded the delivery fee."), "The Support Team"),
    ("my team", "everyone", "announcing that the office will be closed on Friday",
     ("Office closed this Friday", "A quick reminder that the office will be closed this Friday for building "
      "maintenance. Please work from home that day and take anything you need with you on Thursday. Normal hours "
      "resume on Monday."), "Priya"),
    ("a hiring manager", "Mr. Johansson", "following up after a job interview",
     ("Thank you for the interview", "Thank you for taking the time to meet with me on Monday about the data "
      "analyst role. I enjoyed hearing about the team's plans for the new reporting platform, and I am even more "
      "excited about the position. Please let me know if you need anything else from me."), "Aisha Rahman"),
    ("a neighbour", "Claire", "letting her know about a small party on Saturday evening",
     ("Small get-together on Saturday", "We are having a few friends over on Saturday from about seven in the "
      "evening. We will keep the music down and wrap up by eleven, but please knock if it gets too loud. You are "
      "very welcome to join us."), "Marco and Julia"),
    ("a supplier", "Mr. Wong", "asking for a quote for 500 printed mugs",
     ("Quote request: 500 printed mugs", "Could you send us a quote for 500 white ceramic mugs printed with our "
      "two-colour logo? We would need them delivered by the end of next month. Please include the unit price, "
      "setup costs and shipping to Manchester."), "Helen Price"),
    ("a friend", "Sam", "inviting him to go hiking next weekend",
     ("Hiking next weekend?", "Are you free next Saturday? I am planning a day hike on the ridge trail, about 14 km "
      "with a lunch stop at the lake. I can drive and pick you up at eight. Let me know if you are in."), "Jo"),
]

PASSIVE = [
    ("The chef prepared a wonderful meal.", "A wonderful meal was prepared by the chef."),
    ("The committee approved the new budget.", "The new budget was approved by the committee."),
    ("Thousands of people visit the museum every year.", "The museum is visited by thousands of people every year."),
    ("The storm damaged several houses.", "Several houses were damaged by the storm."),
    ("Our team will finish the project by June.", "The project will be finished by our team by June."),
    ("A young engineer designed the bridge.", "The bridge was designed by a young engineer."),
    ("The teacher is grading the exams.", "The exams are being graded by the teacher."),
    ("Someone has stolen my bicycle.", "My bicycle has been stolen."),
    ("The company launched a new product last month.", "A new product was launched by the company last month."),
    ("The volunteers planted two hundred trees.", "Two hundred trees were planted by the volunteers."),
    ("The mayor opened the new library.", "The new library was opened by the mayor."),
    ("Millions of people speak Spanish.", "Spanish is spoken by millions of people."),
]

EXPLANATIONS = [
    ("How do vaccines work?", "Vaccines work by showing the immune system a harmless version or piece of a germ, "
     "such as an inactivated virus or a protein from its surface. The immune system reacts as if it were a real "
     "infection: it makes antibodies and, importantly, memory cells that remember the invader. If the real germ "
     "shows up later, those memory cells recognise it and launch a fast, strong response, often stopping the "
     "infection before it causes serious illness."),
    ("Why is the sky blue?", "Sunlight contains all colours, but as it passes through the atmosphere it bumps into "
     "gas molecules that scatter short wavelengths much more than long ones. Blue light is scattered in every "
     "direction across the sky, so wherever you look you see blue. At sunrise and sunset the light travels "
     "through much more air, most of the blue is scattered away before it reaches you, and the sky turns orange "
     "and red."),
    ("How does a refrigerator keep food cold?", "A refrigerator moves heat from the inside to the outside using a "
     "refrigerant that evaporates and condenses in a loop. Inside, the liquid refrigerant evaporates in coils and "
     "absorbs heat from the food compartment. A compressor then squeezes the gas, making it hot, and it releases "
     "that heat through the coils at the back as it condenses into a liquid again. The cycle repeats whenever the "
     "thermostat senses the inside warming up."),
    ("What causes the seasons?", "The seasons are caused by the tilt of Earth's axis, about 23.5 degrees, not by "
     "changes in our distance from the Sun. As Earth orbits, each hemisphere spends part of the year tilted toward "
     "the Sun, getting more direct light and longer days, which is summer. Six months later the same hemisphere "
     "is tilted away, sunlight arrives at a lower angle and days are short, which is winter."),
    ("How does compound interest make savings grow?", "With compound interest, the interest you earn is added to "
     "your balance, and the next period's interest is calculated on that larger amount. For example, 1,000 "
     "dollars at 5 percent a year becomes 1,050 after one year, then 1,102.50 after two, because the second year "
     "pays interest on the 50 dollars too. Over decades this snowball effect is large: at 5 percent the money "
     "roughly doubles every fourteen years."),
    ("How do tides work?", "Tides are caused mainly by the Moon's gravity pulling on Earth's oceans. The water on "
     "the side facing the Moon is pulled toward it, and on the opposite side the ocean bulges out because the "
     "Earth itself is pulled slightly away from that water. As Earth rotates through these two bulges, most coasts "
     "see two high tides and two low tides each day. When the Sun and Moon line up, their pulls add up and give "
     "extra high spring tides."),
    ("What is a hash table and why is it fast?", "A hash table stores key-value pairs in an array. A hash function "
     "turns each key into an index, so to find a value the program computes the hash and jumps straight to that "
     "slot instead of searching through every entry. When two keys land in the same slot, the table handles the "
     "collision, for example by keeping a short list there. With a good hash function and enough free space, "
     "lookups, inserts and deletes take constant time on average."),
    ("How does a jet engine work?", "A jet engine sucks air in at the front, where a fan and compressor squeeze it "
     "to high pressure. Fuel is sprayed into this compressed air and burned, which heats it and makes it expand "
     "violently. The hot gas rushes out through a turbine, which spins and drives the compressor, and then out of "
     "the nozzle at high speed. Pushing that mass of gas backward produces an equal push forward, which is thrust."),
    ("Why do we have leap years?", "A year, the time Earth takes to orbit the Sun, is about 365.2422 days, not "
     "exactly 365. If calendars ignored the extra quarter day, the seasons would drift by about a day every four "
     "years. Adding February 29 every four years fixes most of that, and skipping the leap day in century years "
     "not divisible by 400, such as 1900, corrects the small remaining error."),
    ("How does the internet deliver a web page?", "When you type an address, your computer first asks a DNS server "
     "to translate the name into an IP address. It then opens a connection to that server and sends an HTTP "
     "request for the page. The server replies with HTML, and your browser reads it and requests any images, "
     "style sheets and scripts it references. All of this data travels in small packets that can take different "
     "routes and are reassembled in the right order at your end."),
    ("What happens during photosynthesis, step by step?", "First, chlorophyll in the leaf captures light energy. "
     "That energy splits water molecules, releasing oxygen and producing energy carriers called ATP and NADPH. "
     "Then, in the Calvin cycle, the plant uses those carriers to fix carbon dioxide from the air into sugar "
     "molecules. The sugar feeds the plant's growth or is stored as starch for later."),
    ("How do noise-cancelling headphones work?", "Noise-cancelling headphones have small microphones that listen "
     "to the sound around you. A chip inverts that sound wave, creating a mirror image whose peaks line up with "
     "the original's troughs, and plays it through the speakers. When the two waves meet they cancel each other "
     "out. The method works best on steady, low-pitched noise such as an aeroplane engine."),
    ("Why does bread rise?", "Bread rises because yeast in the dough eats sugars from the flour and releases carbon "
     "dioxide gas. Kneading develops gluten, a stretchy network of proteins, which traps the gas in tiny bubbles "
     "so the dough puffs up. In the oven the bubbles expand further before the heat sets the structure, which "
     "gives bread its airy crumb."),
    ("How does a bill become a law in the United States?", "A member of Congress introduces a bill, and it goes to "
     "a committee that studies it, holds hearings and may amend it. If the committee approves it, the full House "
     "or Senate debates and votes on it, and then the other chamber does the same. Once both chambers pass the "
     "same text, it goes to the President, who can sign it into law or veto it; Congress can override a veto "
     "with a two-thirds vote in both chambers."),
    ("What is the difference between weather and climate?", "Weather is what the atmosphere is doing at a "
     "particular time and place: today's rain, tomorrow's heat wave. Climate is the pattern of weather averaged "
     "over decades, such as how warm summers usually are or how much rain a region gets in a typical year. In "
     "short, weather is what you get on a given day, climate is what you expect."),
    ("How do electric cars work?", "An electric car stores energy in a large lithium-ion battery pack. When you "
     "press the pedal, an inverter turns the battery's direct current into alternating current for the motor, "
     "which turns the wheels. When you slow down, the motor runs in reverse as a generator and puts some energy "
     "back into the battery, which is called regenerative braking. With few moving parts, they need less "
     "maintenance than petrol cars."),
]

CODE_TASKS = [
    ("Write a Python function that checks whether a string is a palindrome, ignoring case and spaces.",
     "def is_palindrome(text):\n    cleaned = \"\".join(ch.lower() for ch in text if not ch.isspace())\n"
     "    return cleaned == cleaned[::-1]\n\n\nprint(is_palindrome(\"Never odd or even\"))  # True"),
    ("Write a Python function to compute the factorial of a non-negative integer.",
     "def factorial(n):\n    if n < 0:\n        raise ValueError(\"n must be non-negative\")\n    result = 1\n"
     "    for k in range(2, n + 1):\n        result *= k\n    return result\n\n\nprint(factorial(5))  # 120"),
    ("Write a Python function that returns the first n Fibonacci numbers as a list.",
     "def fibonacci(n):\n    numbers = []\n    a, b = 0, 1\n    for _ in range(n):\n        numbers.append(a)\n"
     "        a, b = b, a + b\n    return numbers\n\n\nprint(fibonacci(8))  # [0, 1, 1, 2, 3, 5, 8, 13]"),
    ("How do I count how often each word appears in a text using Python?",
     "You can use collections.Counter after splitting the text into lowercase words:\n\n"
     "from collections import Counter\nimport re\n\n\ndef word_counts(text):\n"
     "    words = re.findall(r\"[a-z']+\", text.lower())\n    return Counter(words)\n\n\n"
     "print(word_counts(\"The cat and the hat.\").most_common(2))  # [('the', 2), ('cat', 1)]"),
    ("Write a Python function that removes duplicates from a list while keeping the original order.",
     "def dedupe(items):\n    seen = set()\n    result = []\n    for item in items:\n        if item not in seen:\n"
     "            seen.add(item)\n            result.append(item)\n    return result\n\n\n"
     "print(dedupe([3, 1, 3, 2, 1]))  # [3, 1, 2]"),
    ("Implement binary search in Python.",
     "def binary_search(sorted_items, target):\n    lo, hi = 0, len(sorted_items) - 1\n    while lo <= hi:\n"
     "        mid = (lo + hi) // 2\n        if sorted_items[mid] == target:\n            return mid\n"
     "        if sorted_items[mid] < target:\n            lo = mid + 1\n        else:\n            hi = mid - 1\n"
     "    return -1\n\n\nprint(binary_search([1, 4, 7, 9, 12], 9))  # 3\n\n"
     "The list must be sorted; each step halves the search range, so it runs in O(log n) time."),
    ("Write a Python function that checks whether a number is prime.",
     "def is_prime(n):\n    if n < 2:\n        return False\n    k = 2\n    while k * k <= n:\n"
     "        if n % k == 0:\n            return False\n        k += 1\n    return True\n\n\n"
     "print([n for n in range(20) if is_prime(n)])  # [2, 3, 5, 7, 11, 13, 17, 19]"),
    ("How can I read a CSV file in Python and print each row as a dictionary?",
     "Use csv.DictReader from the standard library; it uses the header row as keys:\n\nimport csv\n\n"
     "with open(\"people.csv\", newline=\"\", encoding=\"utf-8\") as f:\n    for row in csv.DictReader(f):\n"
     "        print(row)\n\nEach row is a dict such as {'name': 'Ana', 'age': '31'}; note that values are strings."),
    ("Write a Python function that flattens a nested list of lists by one level.",
     "def flatten(nested):\n    return [item for sublist in nested for item in sublist]\n\n\n"
     "print(flatten([[1, 2], [3], [4, 5]]))  # [1, 2, 3, 4, 5]"),
    ("Write a Python function that computes the greatest common divisor of two integers.",
     "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return abs(a)\n\n\nprint(gcd(48, 18))  # 6\n\n"
     "This is Euclid's algorithm. The standard library also has math.gcd."),
    ("Write a SQL query that returns the five customers who spent the most, with their total.",
     "SELECT c.customer_id, c.name, SUM(o.amount) AS total_spent\nFROM customers AS c\n"
     "JOIN orders AS o ON o.customer_id = c.customer_id\nGROUP BY c.customer_id, c.name\n"
     "ORDER BY total_spent DESC\nLIMIT 5;"),
    ("Write a Python function that converts a Roman numeral to an integer.",
     "def roman_to_int(s):\n    values = {\"I\": 1, \"V\": 5, \"X\": 10, \"L\": 50, \"C\": 100, \"D\": 500, "
     "\"M\": 1000}\n    total = 0\n    for i, ch in enumerate(s):\n        v = values[ch]\n"
     "        if i + 1 < len(s) and values[s[i + 1]] > v:\n            total -= v\n        else:\n"
     "            total += v\n    return total\n\n\nprint(roman_to_int(\"MCMXCIV\"))  # 1994"),
    ("Write a JavaScript function that capitalizes the first letter of every word in a sentence.",
     "function capitalizeWords(sentence) {\n  return sentence\n    .split(\" \")\n"
     "    .map(word => word.charAt(0).toUpperCase() + word.slice(1))\n    .join(\" \");\n}\n\n"
     "console.log(capitalizeWords(\"hello big world\")); // \"Hello Big World\""),
    ("Write a Python function that transposes a matrix given as a list of lists.",
     "def transpose(matrix):\n    return [list(row) for row in zip(*matrix)]\n\n\n"
     "print(transpose([[1, 2, 3], [4, 5, 6]]))  # [[1, 4], [2, 5], [3, 6]]"),
    ("Write a Python function that compresses a string with run-length encoding, for example 'aaabcc' -> 'a3b1c2'.",
     "def run_length_encode(text):\n    if not text:\n        return \"\"\n    parts = []\n    current, count = "
     "text[0], 1\n    for ch in text[1:]:\n        if ch == current:\n            count += 1\n        else:\n"
     "            parts.append(f\"{current}{count}\")\n            current, count = ch, 1\n"
     "    parts.append(f\"{current}{count}\")\n    return \"\".join(parts)\n\n\n"
     "print(run_length_encode(\"aaabcc\"))  # a3b1c2"),
    ("How do I check if two strings are anagrams in Python?",
     "Two strings are anagrams if they contain the same letters the same number of times. Comparing sorted "
     "characters is the simplest check:\n\ndef are_anagrams(a, b):\n    return sorted(a.replace(\" \", \"\").lower()) "
     "== sorted(b.replace(\" \", \"\").lower())\n\n\nprint(are_anagrams(\"listen\", \"silent\"))  # True"),
    ("Write a bash command that counts the lines in every .py file in the current directory tree.",
     "find . -name \"*.py\" -print0 | xargs -0 wc -l\n\nThe last line of the output is the total. -print0 and -0 "
     "keep file names with spaces intact."),
    ("Write a Python function that returns the second largest distinct number in a list.",
     "def second_largest(numbers):\n    distinct = sorted(set(numbers), reverse=True)\n    if len(distinct) < 2:\n"
     "        raise ValueError(\"need at least two distinct numbers\")\n    return distinct[1]\n\n\n"
     "print(second_largest([4, 9, 9, 2, 7]))  # 7"),
    ("Write a Python function that sums the digits of an integer.",
     "def digit_sum(n):\n    return sum(int(d) for d in str(abs(n)))\n\n\nprint(digit_sum(4096))  # 19"),
    ("Write a Python class for a simple bank account with deposit and withdraw methods.",
     "class BankAccount:\n    def __init__(self, owner, balance=0.0):\n        self.owner = owner\n"
     "        self.balance = balance\n\n    def deposit(self, amount):\n        if amount <= 0:\n"
     "            raise ValueError(\"deposit must be positive\")\n        self.balance += amount\n\n"
     "    def withdraw(self, amount):\n        if amount > self.balance:\n"
     "            raise ValueError(\"insufficient funds\")\n        self.balance -= amount\n\n\n"
     "acct = BankAccount(\"Ana\")\nacct.deposit(100)\nacct.withdraw(30)\nprint(acct.balance)  # 70.0"),
]
