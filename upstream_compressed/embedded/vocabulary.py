"""The fixed English vocabulary that synthetic sentences are drawn from.

465 common words (function words, everyday nouns, verbs and adjectives). Words whose
pronunciation depends on meaning ("read", "live", "minute", "close", "wind", ...) are left out, so the
lexicon's one pronunciation per word matches what espeak-ng says. Changing this list changes every
corpus made from it: keep it fixed, and bump ``CORPUS_FORMAT`` in ``synth_corpus.py`` if you must.
"""

from __future__ import annotations

WORDS: tuple[str, ...] = tuple(
    """
about above across after again against air all almost along also always among and animal answer any
apple area arm around ask away baby back bad bag ball bank base be bear beautiful because bed been
before began begin behind being below best better between big bird black blue boat body book both
box boy bread bring brother brown build busy but buy call came can car care carry cat catch change
child children city class clean clear cold color come common complete could country course cover
cross cup dark day deep did different dinner do doctor does dog done door down draw dream drink
drive during each early earth easy eat egg end enough even evening every example eye face fact fall
family far farm fast father feel feet few field fill find fine finish fire first fish five floor fly
follow food foot for form found four free friend from front full game garden gave get girl give
glass go gold good got great green ground group grow had half hand happy hard has have he head hear
heart heavy help her here high hill him his hold home horse hot hour house how hundred idea if
important in inside into island it its job just keep kind king kitchen knew know lake land large
last late laugh learn leave left letter life light like line list listen little long look lost love
low made make man many map mark may me mean men might mile milk mind money month moon more morning
most mother mountain move much music must my name near need never new next nice night nine no north
nothing now number of off often old on once one only open or order other our out over page paper
park part party people picture piece place plan plant play please point poor power pretty problem
pull put question quick quiet rain ran reach ready real red remember rest right river road rock room
round run said same saw say school sea second see seem seven shape she ship shop short should show
side simple sing sister sit six size sleep slow small snow so some something song soon sound south
speak stand star start stay step still stone stop story street strong study such summer sun table
take talk teacher tell ten than thank that the their them then there these they thing think this
those thought three through time today together told too took top town tree true try turn two under
until up upon us very voice wait walk wall want warm was watch water way we week well went were west
what when where which while white who why will window winter with without woman word work world
would write year yellow yes yesterday you young your
""".split()
)
